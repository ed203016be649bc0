#!/usr/bin/env python3
"""identity.py PORT CALLED_AE CALLING_AE BIND_IP TYPE USER PASS POS FILE: one pynetdicom
association from BIND_IP (source address) with a User Identity item (PS3.7 D.3.3.7) of TYPE
(0: none) and positive-response-requested POS (0/1); stores FILE. Prints
"ACCEPTED RESPONSE=<hex of the server response, or NONE>" then "STATUS 0x...", or
"REJECTED result source reason", or "ABORTED"."""
import sys, logging
import os
import pydicom
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rj_witness  # noqa: E402
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation

logging.getLogger("pynetdicom").setLevel(logging.ERROR)
port, called, calling, bind_ip, ty, user, pw, pos, f = sys.argv[1:10]
ae = AE(ae_title=calling)
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
ds = pydicom.dcmread(f, stop_before_pixels=True)
ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, [ds.file_meta.TransferSyntaxUID])
ext = []
if int(ty):
    item = UserIdentityNegotiation()
    item.user_identity_type = int(ty)
    item.positive_response_requested = pos == "1"
    item.primary_field = user.encode()
    if int(ty) == 2:
        item.secondary_field = pw.encode()
    ext.append(item)
assoc = ae.associate("127.0.0.1", int(port), ae_title=called, ext_neg=ext, bind_address=(bind_ip, 0), evt_handlers=rj_witness.handlers())
if assoc.is_rejected:
    r = assoc.acceptor.primitive
    print(f"REJECTED {r.result} {r.result_source} {r.diagnostic}")
    sys.exit(0)
if rj_witness.rejected() is not None and not assoc.is_established:
    print("rj_witness: pynetdicom missed the A-ASSOCIATE-RJ it received", file=sys.stderr)
    print("REJECTED %d %d %d" % rj_witness.rejected()); sys.exit(0)
if not assoc.is_established:
    print("ABORTED"); sys.exit(0)
ui = assoc.acceptor.user_identity
print("ACCEPTED RESPONSE=" + ("NONE" if ui is None else (ui.server_response or b"").hex()), flush=True)
status = assoc.send_c_store(f)
print(f"STATUS {status.Status:#06x}" if status else "STATUS NONE", flush=True)
assoc.release()
