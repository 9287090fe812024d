"""Loading and checking the node's YAML configuration.

Why this shape: the defaults live in one documented file (``default_config.yaml``,
identical to ``config/nncodec.yaml``) so that what a hospital engineer reads is
what the node does; this module only lays the user's file over it and checks
every key, so that a typo stops start-up with the key's path and the reason
instead of being silently ignored.
"""
from __future__ import annotations

import copy
import fnmatch
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

import yaml
from pydicom.uid import UID

from . import ceilings as CL

SERVICES = ("echo", "store", "find", "get", "move")
DUPLICATE_POLICIES = ("keep", "replace", "reject")
DEVICES = ("auto", "cpu", "cuda")
CLIENT_CERTIFICATES = ("none", "optional", "required")
TLS_VERSIONS = ("1.2", "1.3")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# actions given by name: the learned codec lossless, JPEG XL or HTJ2K lossless, the smaller of the
# learned codec and JPEG XL, or none
PLAIN_ACTIONS = ("lossless", "jpegxl", "htj2k", "smallest", "keep")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MATCH_KEYS = ("modality", "body_part", "sop_class", "calling_ae", "bits_stored", "photometric", "received_lossy")
# mappings a user file extends entry by entry (an entry set to null is removed) instead of key by key
_MERGED_BY_ENTRY = ("compression.lossy_ceilings",)
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")   # printable ASCII, no backslash
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class ConfigError(ValueError):
    """A configuration key with a wrong value: ``path`` is the key's dotted path."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class Peer:
    name: str
    ae_title: str
    host: str
    port: int
    allow: frozenset[str]
    tls: bool = False


@dataclass(frozen=True)
class TLS:
    """The DICOM TLS listener (``port`` None: none) and what outgoing TLS associations use."""
    port: int | None
    certificate: str
    private_key: str
    client_certificates: str
    ca_certificates: str
    minimum_version: str


@dataclass(frozen=True)
class Rule:
    """One compression rule: ``match`` maps a match key to its allowed values,
    ``action`` is one of :data:`PLAIN_ACTIONS`, "max_error" (with ``max_error`` N) or "ratio"
    (with ``ratio`` R); ``allow_above_ceiling``: the lossy ceilings are not enforced for this
    rule; ``after``: seconds after receipt before the instance is compressed (0: at once)."""
    name: str
    match: dict[str, Any]
    action: str
    max_error: int = 0
    ratio: float = 0.0
    allow_above_ceiling: bool = False
    after: float = 0.0


@dataclass(frozen=True)
class Config:
    ae_title: str
    port: int | None
    bind: str
    storage_path: str
    duplicates: str
    fsync: bool
    min_free_mb: int
    index_url: str
    access: dict[str, str]
    check_called_ae: bool
    check_peer_host: bool
    peers: tuple[Peer, ...]
    device: str
    workers: int
    batch_size: int
    poll_seconds: float
    lease_seconds: float
    rules: tuple[Rule, ...]
    lossy_ceilings: CL.Ceilings
    retrieve_syntaxes: tuple[UID, ...]
    max_associations: int
    max_pdu_size: int
    acse_timeout: float | None
    dimse_timeout: float | None
    network_timeout: float | None
    max_find_results: int
    max_instance_mb: int
    max_pixels: int
    shutdown_grace_seconds: float
    tls: TLS
    commitment_same_association: bool
    commitment_retry_seconds: float
    commitment_give_up_hours: float
    log_level: str
    log_file: str
    pynetdicom_log_level: str
    source: str = field(default="<default>", compare=False)
    # what the node logs as warnings when it starts (the configuration is loaded before logging is set up)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def peer_by_ae(self, ae_title: str) -> Peer | None:
        ae_title = ae_title.strip()
        for p in self.peers:
            if p.ae_title == ae_title:
                return p
        return None


# --- reading ---------------------------------------------------------------------------------------

def default_text() -> str:
    """The packaged default file (read beside this module, which also works when an editable
    install registered ``scp`` as a namespace package)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config.yaml"), encoding="utf-8") as f:
        return f.read()


def _parse_yaml(text: str, origin: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "file"
        raise ConfigError(f"{origin} {where}", f"not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(origin, "the file must hold a mapping of keys")
    return data


def _overlay(base: dict, user: dict, path: str = "") -> dict:
    """``user`` laid over ``base`` key by key; an unknown key is an error."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        here = f"{path}{key}"
        if not isinstance(key, str) or key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(here, f"unknown key (known here: {known})")
        if here in _MERGED_BY_ENTRY:
            if not isinstance(value, dict):
                raise ConfigError(here, "must be a mapping")
            out[key] = _merge_entries(base[key], value, here)
        elif isinstance(base[key], dict) and base[key]:
            if not isinstance(value, dict):
                raise ConfigError(here, "must be a mapping")
            out[key] = _overlay(base[key], value, here + ".")
        else:
            out[key] = value
    return out


def _merge_entries(base: dict, user: dict, path: str) -> dict:
    """``user``'s entries replace or add to ``base``'s (keys compared upper-case); null removes one."""
    out = {k.upper() if isinstance(k, str) else k: v for k, v in base.items()}
    seen = set()
    for key, value in user.items():
        key = key.upper() if isinstance(key, str) else key
        if key in seen:
            raise ConfigError(f"{path}.{key}", "is given twice")
        seen.add(key)
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def load(path: str | None = None) -> Config:
    """The configuration from ``path`` laid over the defaults (``None``: defaults only)."""
    base = _parse_yaml(default_text(), "default_config.yaml")
    if path is None:
        return build(base, "<default>")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the configuration file ({exc.strerror})") from None
    return build(_overlay(base, _parse_yaml(text, str(path))), str(path))


def load_dict(user: dict) -> Config:
    """Like :func:`load` for a mapping (tests and embedding)."""
    base = _parse_yaml(default_text(), "default_config.yaml")
    return build(_overlay(base, user), "<dict>")


# --- checking --------------------------------------------------------------------------------------

def _str(v, path, *, empty=True) -> str:
    if v is None and empty:
        return ""
    if not isinstance(v, str):
        raise ConfigError(path, f"must be text, not {type(v).__name__}")
    if not empty and not v.strip():
        raise ConfigError(path, "must not be empty")
    return v


def _int(v, path, lo=None, hi=None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(path, f"must be a whole number, not {v!r}")
    if lo is not None and v < lo or hi is not None and v > hi:
        raise ConfigError(path, f"must be between {lo} and {hi}" if hi is not None else f"must be at least {lo}")
    return v


def _num(v, path, lo=0.0, allow_none=False) -> float | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(path, f"must be a number{' or null' if allow_none else ''}, not {v!r}")
    if v < lo:
        raise ConfigError(path, f"must be at least {lo}")
    return float(v)


def _bool(v, path) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(path, f"must be true or false, not {v!r}")
    return v


def _choice(v, path, choices) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(path, f"must be one of {', '.join(choices)}, not {v!r}")
    return v


def _ae(v, path) -> str:
    v = _str(v, path, empty=False).strip()
    if not _AE_RE.match(v):
        raise ConfigError(path, "must be an AE title: 1-16 printable ASCII characters without backslash")
    return v


def _mapping(v, path, keys, required=()) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(path, "must be a mapping")
    for k in v:
        if k not in keys:
            raise ConfigError(f"{path}.{k}", f"unknown key (known here: {', '.join(keys)})")
    for k in required:
        if k not in v:
            raise ConfigError(f"{path}.{k}", "is required")
    return v


def _list_of(v, path) -> list:
    return list(v) if isinstance(v, list) else [v]


def transfer_syntax(name, path) -> UID:
    """A transfer syntax given by pydicom name (or NNCodecLossless/NNCodecLossy) or by UID."""
    import dicom_nncodec
    if not isinstance(name, str) or not name:
        raise ConfigError(path, f"must be a transfer syntax name or UID, not {name!r}")
    if name in ("NNCodecLossless", "NNCodecLossy"):
        return getattr(dicom_nncodec, name)
    if _UID_RE.match(name):
        uid = UID(name)
    else:
        uid = dicom_nncodec.syntax.by_keyword(name)      # (pydicom 3.0 lacks the JPEG XL names)
        if uid is None:
            raise ConfigError(path, f"unknown transfer syntax name {name!r}")
    if not (uid.is_transfer_syntax or uid in (dicom_nncodec.NNCodecLossless, dicom_nncodec.NNCodecLossy)):
        raise ConfigError(path, f"{name!r} is not a transfer syntax")
    return uid


def sop_class(name, path) -> str:
    import pynetdicom.sop_class as S
    if not isinstance(name, str) or not name:
        raise ConfigError(path, f"must be a SOP Class UID or name, not {name!r}")
    if _UID_RE.match(name):
        return name
    uid = getattr(S, name, None)
    if not isinstance(uid, str):
        raise ConfigError(path, f"unknown SOP Class name {name!r}")
    return str(uid)


def _bits_ranges(v, path) -> tuple[tuple[int, int], ...]:
    out = []
    for i, item in enumerate(_list_of(v, path)):
        p = f"{path}[{i}]" if isinstance(v, list) else path
        if isinstance(item, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", item):
            lo, hi = (int(x) for x in item.split("-"))
            if lo > hi:
                raise ConfigError(p, f"range {item!r} is empty")
            out.append((lo, hi))
        else:
            n = _int(item, p, 1, 64)
            out.append((n, n))
    return tuple(out)


def _ratio(v, path) -> float:
    """A compression ratio R (of R:1): a number greater than 1."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(path, f"must be a number greater than 1 (R of the ratio R:1), not {v!r}")
    if v <= 1:
        raise ConfigError(path, f"must be greater than 1 (R of the ratio R:1), not {v!r}")
    return float(v)


def duration(v, path) -> float:
    """A delay such as ``7d``, ``12h``, ``30m`` or ``45s`` in seconds."""
    m = _DURATION_RE.match(v) if isinstance(v, str) else None
    if m is None:
        raise ConfigError(path, f"must be a number with a unit: d (days), h (hours), m (minutes) or s "
                                f"(seconds), e.g. 7d or 12h, not {v!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _rule(v, path) -> Rule:
    rule = _rule_action(v, path)
    if "after" not in v:
        return rule
    if rule.action == "keep":
        raise ConfigError(f"{path}.after", "applies only to a rule that compresses (not to action keep)")
    return replace(rule, after=duration(v["after"], f"{path}.after"))


def _rule_action(v, path) -> Rule:
    v = _mapping(v, path, ("name", "match", "action", "allow_above_ceiling", "after"), required=("action",))
    name = _str(v.get("name", ""), f"{path}.name")
    match_in = _mapping(v.get("match") or {}, f"{path}.match", MATCH_KEYS)
    match: dict[str, Any] = {}
    for key, value in match_in.items():
        p = f"{path}.match.{key}"
        if key == "received_lossy":
            match[key] = _bool(value, p)
        elif key == "bits_stored":
            match[key] = _bits_ranges(value, p)
        elif key == "sop_class":
            match[key] = tuple(sop_class(s, p) for s in _list_of(value, p))
        else:
            vals = tuple(_str(s, p, empty=False).strip() for s in _list_of(value, p))
            if key in ("modality", "body_part", "photometric"):
                vals = tuple(s.upper() for s in vals)
            match[key] = vals
    action = v["action"]
    p = f"{path}.action"
    allow = _bool(v.get("allow_above_ceiling", False), f"{path}.allow_above_ceiling")
    if isinstance(action, dict) and "ratio" in action:
        if "max_error" in action:
            raise ConfigError(p, "ratio and max_error exclude each other: give one")
        _mapping(action, p, ("ratio", "max_error"))
        return Rule(name or path, match, "ratio", ratio=_ratio(action["ratio"], f"{p}.ratio"),
                    allow_above_ceiling=allow)
    if allow:
        raise ConfigError(f"{path}.allow_above_ceiling", "applies only to a rule with action {ratio: R}")
    if isinstance(action, dict):
        _mapping(action, p, ("max_error", "ratio"), required=("max_error",))
        return Rule(name or path, match, "max_error", _int(action["max_error"], f"{p}.max_error", 1, 255))
    return Rule(name or path, match, _choice(action, p, PLAIN_ACTIONS))


def _ceiling_key(k, path, what) -> str:
    if not isinstance(k, str) or not k.strip():
        raise ConfigError(path, f"{what} {k!r} must be text (quote it if YAML reads it as something else)")
    if set(k) & set("*?[") or "\\" in k:
        raise ConfigError(path, f"{what} {k!r}: list single values, without wildcards or backslashes")
    return k.strip().upper()


def _ceilings(v, path) -> CL.Ceilings:
    """``compression.lossy_ceilings``: modality -> R, or -> {ratio: R, body_part: {VALUE: R, ...}}."""
    if not isinstance(v, dict):
        raise ConfigError(path, "must be a mapping of modalities to ratios")
    out: dict[str, CL.ModalityCeiling] = {}
    for key, value in v.items():
        modality = _ceiling_key(key, path, "modality")
        p = f"{path}.{modality}"
        if modality in out:
            raise ConfigError(p, "is given twice")
        if isinstance(value, dict):
            _mapping(value, p, ("ratio", "body_part"), required=("ratio",))
            parts_in = value.get("body_part") or {}
            if not isinstance(parts_in, dict):
                raise ConfigError(f"{p}.body_part", "must be a mapping of Body Part Examined values to ratios")
            parts: dict[str, float] = {}
            for bp, r in parts_in.items():
                name = _ceiling_key(bp, f"{p}.body_part", "body part")
                parts[name] = _ratio(r, f"{p}.body_part.{name}")
            out[modality] = CL.ModalityCeiling(_ratio(value["ratio"], f"{p}.ratio"), parts)
        else:
            out[modality] = CL.ModalityCeiling(_ratio(value, p))
    return CL.Ceilings(out)


def _check_ceilings(rules: tuple[Rule, ...], ceilings: CL.Ceilings) -> tuple[str, ...]:
    """Refuse a ``ratio`` rule that could meet an instance whose ceiling is lower (or that has
    none), unless it says ``allow_above_ceiling: true``; returns the warnings for those that do."""
    warnings = []
    for i, rule in enumerate(rules):
        if rule.action != "ratio":
            continue
        limit = CL.for_rule(ceilings, rule.match.get("modality"), rule.match.get("body_part"))
        asks = CL.ratio_text(rule.ratio)
        if limit.allows(rule.ratio):
            if rule.allow_above_ceiling:
                warnings.append(f"rule {rule.name!r} ({asks}) says allow_above_ceiling: true: the lossy "
                                f"ceilings are not checked for the instances it compresses")
            continue
        if limit.ratio is None:
            why = (f"rule {rule.name!r} ({asks}) may match {limit.where}, which has no lossy ceiling in "
                   f"compression.lossy_ceilings, so lossy compression by ratio is not allowed for it")
            fix = "Narrow the rule's match to modalities with a ceiling, give the modality a ceiling"
        else:
            why = f"rule {rule.name!r} asks {asks}, above {limit.describe()} (compression.lossy_ceilings)"
            fix = "Lower the ratio, narrow the rule's match (modality, body_part)"
        if rule.allow_above_ceiling:
            warnings.append(f"{why}; allowed by allow_above_ceiling: true")
            continue
        raise ConfigError(f"compression.rules[{i}].action.ratio",
                          f"{why}. {fix}, or, on the decision of the radiologist in charge, add "
                          f"allow_above_ceiling: true to the rule")
    return tuple(warnings)


def _peer(v, path) -> Peer:
    v = _mapping(v, path, ("name", "ae_title", "host", "port", "allow", "tls"), required=("ae_title", "host", "port"))
    ae = _ae(v["ae_title"], f"{path}.ae_title")
    allow = v.get("allow", list(SERVICES))
    if not isinstance(allow, list):
        raise ConfigError(f"{path}.allow", "must be a list of services")
    for i, s in enumerate(allow):
        _choice(s, f"{path}.allow[{i}]", SERVICES)
    return Peer(_str(v.get("name", ae), f"{path}.name") or ae, ae, _str(v["host"], f"{path}.host", empty=False),
                _int(v["port"], f"{path}.port", 1, 65535), frozenset(allow), _bool(v.get("tls", False), f"{path}.tls"))


def _file(v, path) -> str:
    v = _str(v, path)
    if v and not os.path.isfile(v):
        raise ConfigError(path, f"no such file: {v}")
    return v


def _tls(t: dict, peers: tuple[Peer, ...]) -> TLS:
    port = None if t.get("port") is None else _int(t.get("port"), "tls.port", 0, 65535)
    version = t.get("minimum_version")
    version = _choice(f"{version:.1f}" if isinstance(version, float) else version, "tls.minimum_version",
                      TLS_VERSIONS)
    out = TLS(port, _file(t.get("certificate"), "tls.certificate"), _file(t.get("private_key"), "tls.private_key"),
              _choice(t.get("client_certificates"), "tls.client_certificates", CLIENT_CERTIFICATES),
              _file(t.get("ca_certificates"), "tls.ca_certificates"), version)
    if port is not None:
        for key in ("certificate", "private_key"):
            if not getattr(out, key):
                raise ConfigError(f"tls.{key}", "is required when tls.port is set")
        if out.client_certificates != "none" and not out.ca_certificates:
            raise ConfigError("tls.ca_certificates", f"is required with client_certificates: {out.client_certificates}")
    if bool(out.certificate) != bool(out.private_key):
        raise ConfigError("tls.private_key" if out.certificate else "tls.certificate",
                          "certificate and private_key go together")
    for i, p in enumerate(peers):
        if p.tls and port is None:
            raise ConfigError(f"peers[{i}].tls", "needs the TLS listener (tls.port)")
    return out


def build(d: dict, source: str) -> Config:
    """A checked :class:`Config` from the merged mapping ``d``."""
    st, ix, ac, co, rt, li, lg, cm = (d["storage"], d["index"], d["access"], d["compression"], d["retrieve"],
                                      d["limits"], d["logging"], d["commitment"])
    peers_in = d.get("peers") or []
    if not isinstance(peers_in, list):
        raise ConfigError("peers", "must be a list")
    peers = tuple(_peer(p, f"peers[{i}]") for i, p in enumerate(peers_in))
    seen: dict[str, int] = {}
    for i, p in enumerate(peers):
        if p.ae_title in seen:
            raise ConfigError(f"peers[{i}].ae_title", f"{p.ae_title!r} is already used by peers[{seen[p.ae_title]}]")
        seen[p.ae_title] = i
    rules_in = co.get("rules") or []
    if not isinstance(rules_in, list):
        raise ConfigError("compression.rules", "must be a list")
    syntaxes = rt.get("transfer_syntaxes")
    if not isinstance(syntaxes, list) or not syntaxes:
        raise ConfigError("retrieve.transfer_syntaxes", "must be a non-empty list")
    from .transcode import PRODUCIBLE, NNCodecLossy
    ts = []
    for i, name in enumerate(syntaxes):
        uid = transfer_syntax(name, f"retrieve.transfer_syntaxes[{i}]")
        if uid not in PRODUCIBLE and uid != NNCodecLossy:
            raise ConfigError(f"retrieve.transfer_syntaxes[{i}]",
                              f"{name!r} cannot be produced losslessly by this node")
        ts.append(uid)
    device = _choice(co.get("device"), "compression.device", DEVICES)
    storage_path = _str(st.get("path"), "storage.path", empty=False)
    url = _str(ix.get("url"), "index.url")
    if url:
        try:
            from sqlalchemy.engine import make_url
            make_url(url)
        except Exception as exc:
            raise ConfigError("index.url", f"not an SQLAlchemy database URL ({exc})") from None
    tls = _tls(d["tls"], peers)
    rules = tuple(_rule(r, f"compression.rules[{i}]") for i, r in enumerate(rules_in))
    ceilings = _ceilings(co.get("lossy_ceilings"), "compression.lossy_ceilings")
    warnings = _check_ceilings(rules, ceilings)
    port = None if d["port"] is None else _int(d["port"], "port", 0, 65535)
    if port is None and tls.port is None:
        raise ConfigError("port", "may be null only when tls.port is set (the node needs a listener)")
    return Config(
        ae_title=_ae(d["ae_title"], "ae_title"),
        port=port,
        bind=_str(d["bind"], "bind", empty=False),
        storage_path=storage_path,
        duplicates=_choice(st.get("duplicates"), "storage.duplicates", DUPLICATE_POLICIES),
        fsync=_bool(st.get("fsync"), "storage.fsync"),
        min_free_mb=_int(st.get("min_free_mb"), "storage.min_free_mb", 0),
        index_url=url,
        access={s: _choice(ac.get(s), f"access.{s}", ("any", "peers")) for s in SERVICES},
        check_called_ae=_bool(ac.get("check_called_ae"), "access.check_called_ae"),
        check_peer_host=_bool(ac.get("check_peer_host"), "access.check_peer_host"),
        peers=peers,
        device=device,
        workers=_int(co.get("workers"), "compression.workers", 0, 64),
        batch_size=_int(co.get("batch_size"), "compression.batch_size", 1, 4096),
        poll_seconds=_num(co.get("poll_seconds"), "compression.poll_seconds", 0.01),
        lease_seconds=_num(co.get("lease_seconds"), "compression.lease_seconds", 3.0),
        rules=rules,
        lossy_ceilings=ceilings,
        retrieve_syntaxes=tuple(ts),
        max_associations=_int(li.get("max_associations"), "limits.max_associations", 1, 1000),
        max_pdu_size=_int(li.get("max_pdu_size"), "limits.max_pdu_size", 0),
        acse_timeout=_num(li.get("acse_timeout"), "limits.acse_timeout", 0.1, allow_none=True),
        dimse_timeout=_num(li.get("dimse_timeout"), "limits.dimse_timeout", 0.1, allow_none=True),
        network_timeout=_num(li.get("network_timeout"), "limits.network_timeout", 0.1, allow_none=True),
        max_find_results=_int(li.get("max_find_results"), "limits.max_find_results", 0),
        max_instance_mb=_int(li.get("max_instance_mb"), "limits.max_instance_mb", 1),
        max_pixels=_int(li.get("max_pixels"), "limits.max_pixels", 1),
        shutdown_grace_seconds=_num(li.get("shutdown_grace_seconds"), "limits.shutdown_grace_seconds", 0),
        log_level=_choice(str(lg.get("level")).upper(), "logging.level", LOG_LEVELS),
        log_file=_str(lg.get("file"), "logging.file"),
        pynetdicom_log_level=_choice(str(lg.get("pynetdicom_level")).upper(), "logging.pynetdicom_level", LOG_LEVELS),
        tls=tls,
        commitment_same_association=_bool(cm.get("same_association"), "commitment.same_association"),
        commitment_retry_seconds=_num(cm.get("retry_seconds"), "commitment.retry_seconds", 0.1),
        commitment_give_up_hours=_num(cm.get("give_up_hours"), "commitment.give_up_hours", 0),
        source=source,
        warnings=warnings,
    )


def resolved_index_url(cfg: Config) -> str:
    if cfg.index_url:
        return cfg.index_url
    return "sqlite:///" + os.path.join(os.path.abspath(cfg.storage_path), "index.sqlite")


# --- the access policy -----------------------------------------------------------------------------

def allowed(cfg: Config, calling_ae: str, service: str, address: str | None = None, tls: bool | None = None) -> bool:
    """Orthanc's rule: a listed peer may use the services in its ``allow`` list;
    anyone else those set to ``any`` under ``access``.  ``address`` and ``tls`` (how the caller
    connected; None: not known) matter for :func:`impostor`, who gets nothing."""
    peer = cfg.peer_by_ae(calling_ae)
    if peer is not None:
        if impostor(cfg, peer, address, tls):
            return False
        return service in peer.allow
    return cfg.access[service] == "any"


def impostor(cfg: Config, peer: Peer, address: str | None, tls: bool | None) -> str:
    """Why a caller using a listed peer's AE title is not that peer ("" when it may be): it
    connected from another host (``access.check_peer_host``), or without TLS to a ``tls: true``
    peer.  Such a caller is refused everything, also what strangers may do: it claims an
    identity that the rules (and the stored Source AE Title) would trust."""
    if cfg.check_peer_host and address is not None and not _host_matches(peer.host, address):
        return f"connected from {address}, not from {peer.host}"
    if peer.tls and tls is False:
        return "connected without TLS (the peer is configured with tls: true)"
    return ""


def _host_matches(host: str, address: str) -> bool:
    if host == address:
        return True
    import socket
    try:
        return address in {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return False


def text_matches(patterns: tuple[str, ...], value: str) -> bool:
    """Rule matching of text values: any pattern, * and ? wildcards."""
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)
