#!/usr/bin/env python3
"""qr_scp.py PORT MODE: a hostile Patient Root Query/Retrieve C-FIND SCP (pynetdicom), AE title
QRSCP, that answers every C-FIND for PatientID PAT1 according to MODE:
  endless  - pending responses without end, each a valid match;
  bad      - a match for another patient, one without a Study Instance UID, one with an invalid
             UID, then one good match (1.2.826.0.1.3680043.10.88.1) and success;
  huge     - one pending response whose identifier holds a 2 MiB element, then success.
Prints LISTENING once it accepts associations."""
import sys, logging
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
port, mode = int(sys.argv[1]), sys.argv[2]


def match(uid, patient="PAT1"):
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient
    ds.StudyInstanceUID = uid
    ds.StudyDate = "20200101"
    return ds


def on_find(event):
    if mode == "endless":
        i = 0
        while True:
            i += 1
            yield 0xFF00, match(f"1.2.826.0.1.3680043.10.88.{i}")
    elif mode == "bad":
        yield 0xFF00, match("1.2.826.0.1.3680043.10.88.9", patient="OTHER")
        no_uid = match("1.2.3")
        del no_uid.StudyInstanceUID
        yield 0xFF00, no_uid
        yield 0xFF00, match("1.2.x.3")
        yield 0xFF00, match("1.2.826.0.1.3680043.10.88.1")
        yield 0x0000, None
    elif mode == "huge":
        ds = match("1.2.826.0.1.3680043.10.88.1")
        ds.StudyDescription = "x" * 60000
        ds.add_new(0x00091010, "OB", b"\0" * (2 << 20))
        yield 0xFF00, ds
        yield 0x0000, None


ae = AE(ae_title="QRSCP")
ae.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
ae.dimse_timeout = ae.network_timeout = 30
print("LISTENING", flush=True)
ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_FIND, on_find)])
