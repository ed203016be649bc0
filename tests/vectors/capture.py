#!/usr/bin/env python3
"""Captures real PDUs as .bin test vectors: a TCP relay records what real peers (DCMTK's
storescu/echoscu/storescp, pynetdicom's SCU/SCP) send each other, split into PDUs.

Run from this directory: python3 capture.py  (needs Debian dcmtk and PyPI pynetdicom).
The .bin files are committed; this script documents how they were made."""
import os, socket, subprocess, sys, threading, time

TEST_FILES = os.path.join(os.path.dirname(__import__("pydicom").__file__), "data", "test_files")
OUT = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, TCP_NODELAY="1")
NAMES = {1: "associate_rq", 2: "associate_ac", 3: "associate_rj", 4: "p_data_tf",
         5: "release_rq", 6: "release_rp", 7: "abort"}


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def relay(listen_port, target_port, record):
    """Accepts one connection, relays it to target, records each direction's bytes."""
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen_port)); srv.listen(1)

    def pump(a, b, key):
        while True:
            try:
                d = a.recv(65536)
            except OSError:
                d = b""
            if not d:
                try: b.shutdown(socket.SHUT_WR)
                except OSError: pass
                return
            record[key] += d
            try: b.sendall(d)
            except OSError: return

    def run():
        c, _ = srv.accept(); srv.close()
        t = socket.create_connection(("127.0.0.1", target_port))
        for s in (c, t): s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        th = [threading.Thread(target=pump, args=(c, t, "rq")), threading.Thread(target=pump, args=(t, c, "ac"))]
        [x.start() for x in th]; [x.join() for x in th]
        c.close(); t.close()
    th = threading.Thread(target=run, daemon=True); th.start(); return th


def pdus(stream):
    out, pos = [], 0
    while pos + 6 <= len(stream):
        n = int.from_bytes(stream[pos + 2:pos + 6], "big")
        out.append(stream[pos:pos + 6 + n]); pos += 6 + n
    return out


def save(prefix, record, wanted):
    """Writes the first PDU of each wanted (direction, type) as PREFIX_NAME.bin; P-DATA-TF PDUs
    are numbered."""
    for key in ("rq", "ac"):
        count = {}
        for p in pdus(record[key]):
            t = p[0]; name = NAMES.get(t, "unknown")
            count[t] = count.get(t, 0) + 1
            label = (f"{name}_{count[t]}" if key == "rq" else f"{name}_rsp_{count[t]}") if t == 4 else name
            if (key, name) in wanted and (t == 4 or count[t] == 1):
                fn = os.path.join(OUT, f"{prefix}_{label}.bin")
                open(fn, "wb").write(p); print("wrote", os.path.basename(fn), len(p), "bytes")


def wait_port(port):
    for _ in range(100):
        try: socket.create_connection(("127.0.0.1", port)).close(); return
        except OSError: time.sleep(0.05)


def dcmtk():
    scp = free_port()
    p = subprocess.Popen(["/usr/bin/storescp", "--ignore", "-pdu", "16384", str(scp)], env=ENV)
    wait_port(scp)
    try:
        port = free_port(); rec = {"rq": b"", "ac": b""}; t = relay(port, scp, rec)
        subprocess.run(["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "ANY-SCP", "-pdu", "16384",
                        "127.0.0.1", str(port), os.path.join(TEST_FILES, "CT_small.dcm")], env=ENV, check=True)
        t.join(5)
        save("dcmtk", rec, {("rq", "associate_rq"), ("ac", "associate_ac"), ("rq", "p_data_tf"),
                            ("ac", "p_data_tf"), ("rq", "release_rq"), ("ac", "release_rp")})
        port = free_port(); rec = {"rq": b"", "ac": b""}; t = relay(port, scp, rec)
        subprocess.run(["/usr/bin/echoscu", "--abort", "127.0.0.1", str(port)], env=ENV, check=True)
        t.join(5); save("dcmtk_echo", rec, {("rq", "abort")})
    finally:
        p.kill()
    scp = free_port()
    p = subprocess.Popen(["/usr/bin/storescp", "--refuse", str(scp)], env=ENV); wait_port(scp)
    try:
        port = free_port(); rec = {"rq": b"", "ac": b""}; t = relay(port, scp, rec)
        subprocess.run(["/usr/bin/echoscu", "127.0.0.1", str(port)], env=ENV)
        t.join(5); save("dcmtk_refused", rec, {("ac", "associate_rj")})
    finally:
        p.kill()


def pynetdicom_():
    from pynetdicom import AE, evt, build_role
    from pynetdicom.pdu_primitives import (SOPClassExtendedNegotiation, AsynchronousOperationsWindowNegotiation,
                                           SOPClassCommonExtendedNegotiation, UserIdentityNegotiation)
    from pynetdicom.sop_class import Verification, CTImageStorage
    ae = AE(ae_title="PYSCP")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, scp_role=True, scu_role=True)
    ae.require_called_aet = True
    handlers = [(evt.EVT_USER_ID, lambda event, *a: (True, b"server-response"))]
    scp = free_port()
    server = ae.start_server(("127.0.0.1", scp), block=False, evt_handlers=handlers)
    try:
        # An A-ASSOCIATE-RQ with every user information sub-item pynetdicom can send.
        port = free_port(); rec = {"rq": b"", "ac": b""}; t = relay(port, scp, rec)
        scu = AE(ae_title="PYSCU")
        scu.add_requested_context(Verification)
        scu.add_requested_context(CTImageStorage)
        ext = SOPClassExtendedNegotiation()
        ext.sop_class_uid = CTImageStorage; ext.service_class_application_information = b"\x01\x00"
        cext = SOPClassCommonExtendedNegotiation()
        cext.sop_class_uid = CTImageStorage; cext.service_class_uid = "1.2.840.10008.4.2"
        cext.related_general_sop_class_identification = ["1.2.840.10008.5.1.4.1.1.2.1"]
        uid = UserIdentityNegotiation()
        uid.user_identity_type = 2; uid.primary_field = b"user"; uid.secondary_field = b"pass"
        uid.positive_response_requested = True
        aow = AsynchronousOperationsWindowNegotiation()
        aow.maximum_number_operations_invoked = 4; aow.maximum_number_operations_performed = 2
        scu.maximum_pdu_size = 16382
        roles = [build_role(CTImageStorage, scu_role=True, scp_role=True)]
        a = scu.associate("127.0.0.1", port, ae_title="PYSCP", ext_neg=roles + [aow, ext, cext, uid])
        assert a.is_established, "pynetdicom association failed"
        a.send_c_echo(); a.release(); t.join(5)
        save("pynetdicom", rec, {("rq", "associate_rq"), ("ac", "associate_ac"), ("rq", "p_data_tf"),
                                 ("ac", "p_data_tf"), ("rq", "release_rq"), ("ac", "release_rp")})
        # Wrong called AE title: pynetdicom rejects.
        port = free_port(); rec = {"rq": b"", "ac": b""}; t = relay(port, scp, rec)
        a = scu.associate("127.0.0.1", port, ae_title="WRONG")
        t.join(5); save("pynetdicom_refused", rec, {("ac", "associate_rj")})
        # An abort from pynetdicom.
        port = free_port(); rec = {"rq": b"", "ac": b""}; t = relay(port, scp, rec)
        a = scu.associate("127.0.0.1", port, ae_title="PYSCP"); a.abort(); t.join(5)
        save("pynetdicom", rec, {("rq", "abort")})
    finally:
        server.shutdown()


if __name__ == "__main__":
    dcmtk(); pynetdicom_()
