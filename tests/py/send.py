#!/usr/bin/env python3
"""send.py PORT CALLED_AE FILE...: pynetdicom C-STOREs each file, proposing the file's own SOP
class and transfer syntax, and prints one line per file: STATUS FILE (or REJECTED / ABORTED).
Files are passed as paths, so pynetdicom sends their data set bytes as read."""
import sys, logging
import os
import pydicom
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rj_witness  # noqa: E402
from pynetdicom import AE

logging.getLogger("pynetdicom").setLevel(logging.ERROR)
port, called, files = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
ae = AE(ae_title="PYNETDICOM")
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
pairs = []
for f in files:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    pair = (ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
    if pair not in pairs:
        pairs.append(pair)
for sop, ts in pairs:
    ae.add_requested_context(sop, [ts])
assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=rj_witness.handlers())
if assoc.is_rejected:
    r = assoc.acceptor.primitive
    print(f"REJECTED {r.result} {r.result_source} {r.diagnostic}")
    sys.exit(0)
if rj_witness.rejected() is not None and not assoc.is_established:
    print("rj_witness: pynetdicom missed the A-ASSOCIATE-RJ it received", file=sys.stderr)
    print("REJECTED %d %d %d" % rj_witness.rejected()); sys.exit(0)
if not assoc.is_established:
    print("ABORTED"); sys.exit(0)
for f in files:
    status = assoc.send_c_store(f)
    print(f"{status.Status} {f}" if status else f"NONE {f}", flush=True)
assoc.release()
