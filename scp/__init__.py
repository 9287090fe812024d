"""The dicom-nncodec DICOM node: Storage, Verification and Query/Retrieve SCP with background
learned compression and transcoding on retrieve.

Start it with ``dicom-nncodec serve --config FILE`` (:func:`scp.node.serve`), or in-process with
``scp.node.Node(scp.config.load(FILE)).start()``.
"""
