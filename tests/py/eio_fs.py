"""eio_fs.py ROOT MOUNTPOINT SWITCH [no-fallocate]: a FUSE file system (fusepy over libfuse2) that passes
everything through to the directory ROOT, and answers EIO while the file SWITCH exists: a real
file system returning a real EIO to the node's own system calls (device-mapper's error target
is not available in this kernel).

SWITCH holds words:
  fsync          fsync, fdatasync and directory fsync fail with EIO (the default)
  write          writes fail with EIO too
  once           the first failure removes SWITCH
  delay=SECONDS  a failing fsync waits this long before it fails
  only=GLOB      only files whose name matches GLOB fail (fnmatch on the base name)

A failing fsync also does what Linux does to the pages it could not write (PostgreSQL's
"fsyncgate"): the kernel marks them clean and reports the error once; what they held never
reaches the disk. Here every byte written to that file since its last successful fsync is set
back to zero in ROOT (the node's segments are zero-filled or fallocated: zero is what the disk
held), so a later fsync that succeeds does not make them durable either.

With no-fallocate, fallocate answers EOPNOTSUPP, as on a file system without it (NFS before
4.2, ext3's block-mapped files, FUSE file systems that do not implement it).

fusepy has no fallocate, which the segment log uses: the operations table is extended with
libfuse 2.9's fields after ioctl (poll, write_buf, read_buf, flock, fallocate).
"""

import ctypes
import errno
import fnmatch
import os
import sys
import threading
import time

try:
    import fuse
except ImportError:  # Debian's python3-fusepy names the module fusepy
    import fusepy as fuse


class Operations(ctypes.Structure):
    _fields_ = fuse.fuse_operations._fields_ + [
        ("poll", ctypes.c_voidp),
        ("write_buf", ctypes.c_voidp),
        ("read_buf", ctypes.c_voidp),
        ("flock", ctypes.c_voidp),
        (
            "fallocate",
            ctypes.CFUNCTYPE(
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                fuse.c_off_t,
                fuse.c_off_t,
                ctypes.POINTER(fuse.fuse_file_info),
            ),
        ),
    ]


fuse.fuse_operations = Operations


class Fuse(fuse.FUSE):
    def fallocate(self, path, mode, offset, length, fip):
        return self.operations(
            "fallocate", path.decode(self.encoding), mode, offset, length, fip.contents.fh
        )


class Passthrough(fuse.Operations):
    def __init__(self, root, switch, fallocate=True):
        self.root = os.path.realpath(root)
        self.switch = switch
        self.can_fallocate = fallocate
        self.guard = threading.Lock()
        # path -> [(offset, length)] written since its last successful fsync
        self.unsynced = {}

    def full(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def failing(self, what, path):
        """Whether `what` ("fsync" or "write") on `path` fails now; the words of SWITCH."""
        try:
            with open(self.switch) as f:
                words = f.read().split()
        except FileNotFoundError:
            return None
        opts = dict(w.split("=", 1) for w in words if "=" in w)
        if "only" in opts and not fnmatch.fnmatch(os.path.basename(path), opts["only"]):
            return None
        if what == "write" and "write" not in words:
            return None
        if "once" in words:
            try:
                os.unlink(self.switch)
            except FileNotFoundError:
                return None  # another thread took the one failure
        return float(opts.get("delay", 0))

    def fail_sync(self, path):
        delay = self.failing("fsync", path)
        if delay is None:
            return False
        time.sleep(delay)
        with self.guard:
            ranges = self.unsynced.pop(path, [])
        fd = os.open(self.full(path), os.O_WRONLY)
        try:
            for offset, length in ranges:
                os.pwrite(fd, b"\0" * length, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    # -- files and directories -------------------------------------------------------------

    def access(self, path, mode):
        if not os.access(self.full(path), mode):
            raise fuse.FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.lstat(self.full(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size",
                "st_uid", "st_blocks")
        return {k: getattr(st, k) for k in keys}

    def chmod(self, path, mode):
        os.chmod(self.full(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self.full(path), uid, gid)

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self.full(path))

    def readlink(self, path):
        return os.readlink(self.full(path))

    def mknod(self, path, mode, dev):
        os.mknod(self.full(path), mode, dev)

    def mkdir(self, path, mode):
        os.mkdir(self.full(path), mode)

    def rmdir(self, path):
        os.rmdir(self.full(path))

    def unlink(self, path):
        os.unlink(self.full(path))
        with self.guard:
            self.unsynced.pop(path, None)

    def symlink(self, name, target):
        os.symlink(target, self.full(name))

    def link(self, target, name):
        os.link(self.full(name), self.full(target))

    def rename(self, old, new):
        os.rename(self.full(old), self.full(new))
        with self.guard:
            if old in self.unsynced:
                self.unsynced[new] = self.unsynced.pop(old)

    def utimens(self, path, times=None):
        os.utime(self.full(path), times)

    def statfs(self, path):
        st = os.statvfs(self.full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def fsyncdir(self, path, datasync, fh):
        if self.failing("fsync", path) is not None:
            raise fuse.FuseOSError(errno.EIO)
        fd = os.open(self.full(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- file contents ---------------------------------------------------------------------

    def open(self, path, flags):
        return os.open(self.full(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self.full(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, length, offset, fh):
        return os.pread(fh, length, offset)

    def write(self, path, data, offset, fh):
        if self.failing("write", path) is not None:
            raise fuse.FuseOSError(errno.EIO)
        n = os.pwrite(fh, data, offset)
        with self.guard:
            self.unsynced.setdefault(path, []).append((offset, n))
        return n

    def truncate(self, path, length, fh=None):
        os.truncate(self.full(path), length)

    def fallocate(self, path, mode, offset, length, fh):
        if not self.can_fallocate:
            raise fuse.FuseOSError(errno.EOPNOTSUPP)
        os.posix_fallocate(fh, offset, length)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)

    def fsync(self, path, datasync, fh):
        if self.fail_sync(path):
            raise fuse.FuseOSError(errno.EIO)
        (os.fdatasync if datasync else os.fsync)(fh)
        with self.guard:
            self.unsynced.pop(path, None)


def main():
    root, mountpoint, switch = sys.argv[1:4]
    fallocate = "no-fallocate" not in sys.argv[4:]
    Fuse(Passthrough(root, switch, fallocate), mountpoint, foreground=True, nothreads=False,
         big_writes=True, allow_other=True)


if __name__ == "__main__":
    main()
