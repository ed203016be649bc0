#!/usr/bin/env python3
"""hold.py PORT CALLED_AE GO_FILE N FILE...: one pynetdicom association sends the first N files,
prints SENT, waits (association open) until GO_FILE exists, sends the rest, releases, and prints
one status per file."""
import os, sys, time, logging
import pydicom
from pynetdicom import AE

logging.getLogger("pynetdicom").setLevel(logging.ERROR)
port, called, go, n, files = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
ae = AE(ae_title="HOLD")
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
for f in files[:1]:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, [ds.file_meta.TransferSyntaxUID])
assoc = ae.associate("127.0.0.1", port, ae_title=called)
assert assoc.is_established
statuses = [assoc.send_c_store(f).Status for f in files[:n]]
print("SENT", flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
statuses += [assoc.send_c_store(f).Status for f in files[n:]]
assoc.release()
print(" ".join(f"{s:#06x}" for s in statuses), flush=True)
