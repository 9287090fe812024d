"""Shared fixtures.  Tests use pydicom's bundled files, the pydicom-data package and generated
images only; nothing from outside the installed packages."""
from __future__ import annotations

import pytest
import torch

import dicom_nncodec  # noqa: F401  (registers the transfer syntaxes)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)




# --- PostgreSQL: a throwaway server for the whole session, a new database per test -------------------------

@pytest.fixture(scope="session")
def postgres_server():
    """A running throwaway cluster (scp.pgcluster), or the URL of NNCODEC_TEST_POSTGRES_URL; skips with
    the reason when neither is possible."""
    import os

    from scp import pgcluster
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg 3) is not installed")
    given = os.environ.get(pgcluster.ENV_URL, "")
    if given:
        yield given
        return
    try:
        cluster = pgcluster.Cluster().start()
    except pgcluster.Unavailable as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of an empty PostgreSQL database for this test."""
    from scp import pgcluster
    if isinstance(postgres_server, str):
        return pgcluster.empty(postgres_server)
    return postgres_server.new_database("t")


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request) -> str:
    """Each test that uses it runs twice: "" (SQLite inside the storage folder) and an empty PostgreSQL database."""
    return "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


@pytest.fixture
def index_backend(index_url, monkeypatch) -> str:
    """Nodes started by scp.testing.running_node/node_config use ``index_url`` unless a test gives its own
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("index_backend")``)."""
    from scp import testing
    monkeypatch.setattr(testing, "DEFAULT_INDEX_URL", index_url)
    return index_url
