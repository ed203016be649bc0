#!/usr/bin/env python3
"""tls_send.py PORT CA CERT KEY FILE...: pynetdicom over TLS (an ssl.SSLContext trusting CA,
presenting the client certificate CERT/KEY, "-" for none; server name 127.0.0.1): C-ECHO, then
C-STORE of each file. Prints "ECHO STATUS", one "STATUS FILE" per file, or ABORTED/REJECTED
(a refused handshake is ABORTED: pynetdicom reports no association)."""
import sys, ssl, logging
import os
import pydicom
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rj_witness  # noqa: E402
from pynetdicom import AE
from pynetdicom.sop_class import Verification

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
port, ca, cert, key, files = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
cx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
if cert != "-":
    cx.load_cert_chain(certfile=cert, keyfile=key)
ae = AE(ae_title="PYNETDICOM")
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
ae.add_requested_context(Verification)
pairs = []
for f in files:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    pair = (ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
    if pair not in pairs:
        pairs.append(pair)
for sop, ts in pairs:
    ae.add_requested_context(sop, [ts])
assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGATE", tls_args=(cx, "127.0.0.1"), evt_handlers=rj_witness.handlers())
if assoc.is_rejected:
    print("REJECTED"); sys.exit(0)
if rj_witness.rejected() is not None and not assoc.is_established:
    print("rj_witness: pynetdicom missed the A-ASSOCIATE-RJ it received", file=sys.stderr)
    print("REJECTED"); sys.exit(0)
if not assoc.is_established:
    print("ABORTED"); sys.exit(0)
status = assoc.send_c_echo()
print(f"ECHO {status.Status}" if status else "ECHO NONE", flush=True)
for f in files:
    status = assoc.send_c_store(f)
    print(f"{status.Status} {f}" if status else f"NONE {f}", flush=True)
assoc.release()
