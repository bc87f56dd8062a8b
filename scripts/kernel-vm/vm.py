#!/usr/bin/python3
"""Keel's real-kernel harness: boots Debian's own kernel (which has nbd.ko) in
QEMU with the host's root shared read-only over virtio-9p, and runs one
command inside it. See ../../../shared/KERNEL-VM.md for why it looks like this.

  vm.py prepare            download and unpack the kernel, build the initramfs (cached)
  vm.py run [--timeout S] [--systemd] [--disk URI]... [--run-dir DIR] -- COMMAND...
                           boot, run COMMAND as root in the guest (the host's
                           filesystem, read-only, under a tmpfs overlay), print
                           its output, exit with its status; with --systemd the
                           guest boots the host's systemd as PID 1 and COMMAND
                           runs as a unit once basic.target is reached

COMMAND runs in the run directory, a read-write share at the same path on both
sides (with --run-dir, that directory, kept afterwards; else a fresh one under
/var/tmp, removed on success). Each --disk attaches a virtio disk (/dev/vda,
/dev/vdb, ...) served over NBD by the host (e.g. nbd+unix:///?socket=PATH):
QEMU's own NBD client, cache=none, so the guest's FLUSH and FUA reach the
server. start() and wait() do the same from Python, for a caller that kills
the guest itself (Tests/KernelScenarios/power-cut.py).

Everything is cached in .build-vm/ at the repository's root. The guest has no
network device: every process of a test runs inside it, on its loopback.
"""
import argparse
import glob
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CACHE = os.path.join(REPO, ".build-vm")
# Loaded in this order (dependencies first, resolved from each module's .modinfo).
MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay", "ext4", "crc32c_generic", "loop", "virtio_blk",
           "tls", "gcm", "ctr", "ghash_generic",  # kTLS: the TLS upper layer and AES-GCM (AES is built in)
           "veth",  # nodes as network namespaces linked by veth pairs
           "dm_mod"]  # the device-mapper device a host mounts over /dev/nbdX (held during an engine switch)
GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m 2>/dev/null; done
insmod /modules/nbd.ko nbds_max=8
mkdir -p /host /overlay /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,cache=mmap,msize=262144 hostroot /host || { echo "vm: cannot mount the host root" > /dev/ttyS1; reboot -f; }
mount -t tmpfs -o size=75% tmpfs /overlay
mkdir -p /overlay/upper /overlay/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/overlay/upper,workdir=/overlay/work /newroot
run=$(cat /run-dir)
mkdir -p /newroot$run
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /newroot$run
for d in proc sys dev; do mount --rbind /$d /newroot/$d; done
mount -t devpts devpts /newroot/dev/pts 2>/dev/null
mount -t tmpfs tmpfs /newroot/run
if [ -e /newroot$run/keel-vm-test.target ]; then
    cp /newroot$run/keel-vm-test.target /newroot$run/keel-vm-test.service /newroot/etc/systemd/system/
    # Debian's tmpfiles empty /tmp at boot: it may hold the repository under test.
    mkdir -p /newroot/etc/tmpfiles.d && echo "d /tmp 1777 root root -" > /newroot/etc/tmpfiles.d/tmp.conf
    exec switch_root /newroot /lib/systemd/systemd --unit=keel-vm-test.target
fi
chroot /newroot /bin/sh -c "cd $run && exec /bin/sh $run/command.sh" > /dev/ttyS1 2>&1
echo $? > /newroot$run/exit-status
sync
reboot -f
"""


def log(message):
    print("vm: " + message, file=sys.stderr, flush=True)


def kernel_package():
    depends = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)", depends)
    if not match:
        sys.exit("vm: cannot tell which kernel linux-image-amd64 stands for:\n" + depends)
    return match.group(1)


def extract_vmlinux(vmlinuz, out):
    """The ELF kernel inside a bzImage: find the xz payload and unpack it
    (QEMU boots an ELF vmlinux directly, without the slow decompressor)."""
    data = open(vmlinuz, "rb").read()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        sys.exit("vm: no xz payload in %s" % vmlinuz)
    kernel = lzma.LZMADecompressor().decompress(data[start:])
    if kernel[:4] != b"\x7fELF":
        sys.exit("vm: the payload of %s is not an ELF kernel" % vmlinuz)
    open(out, "wb").write(kernel)


def module_depends(path):
    match = re.search(rb"depends=([^\x00]*)\x00", open(path, "rb").read())
    return [d for d in match.group(1).decode().split(",") if d] if match else []


def module_order(module_dir):
    paths = {}
    for path in glob.glob(os.path.join(module_dir, "kernel", "**", "*.ko"), recursive=True):
        paths[os.path.basename(path)[:-3].replace("-", "_")] = path
    order, seen = [], set()

    def visit(name):
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in paths:
            sys.exit("vm: module %s not found in %s" % (name, module_dir))
        for dependency in module_depends(paths[name]):
            visit(dependency)
        order.append(paths[name])

    for name in MODULES:
        visit(name)
    return order, paths["nbd"]


def ensure_tools():
    missing = [package for tool, package in [("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static"),
                                             ("cpio", "cpio")] if not shutil.which(tool)]
    if missing:
        log("installing " + " ".join(missing))
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + missing, check=True,
                       stdout=subprocess.DEVNULL, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def prepare():
    ensure_tools()
    package = kernel_package()
    # The initramfs is rebuilt whenever the guest's init or module list changes.
    recipe = hashlib.sha256((GUEST_INIT + " ".join(MODULES)).encode()).hexdigest()[:12]
    stamp = os.path.join(CACHE, "%s-%s.ready" % (package, recipe))
    if os.path.exists(stamp):
        return
    busybox = shutil.which("busybox")
    os.makedirs(CACHE, exist_ok=True)
    work = tempfile.mkdtemp(dir=CACHE)
    log("downloading %s" % package)
    subprocess.run(["apt-get", "download", "-q", package], cwd=work, check=True, stderr=subprocess.DEVNULL)
    deb = glob.glob(os.path.join(work, package + "_*.deb"))[0]
    subprocess.run(["dpkg-deb", "-x", deb, os.path.join(work, "root")], check=True)
    vmlinuz = glob.glob(os.path.join(work, "root", "boot", "vmlinuz-*"))[0]
    # Written aside and renamed, so that a guest booting meanwhile reads either version whole.
    extract_vmlinux(vmlinuz, os.path.join(work, "vmlinux"))

    initramfs = os.path.join(work, "initramfs")
    for d in ["bin", "proc", "sys", "dev", "modules"]:
        os.makedirs(os.path.join(initramfs, d))
    shutil.copy(busybox, os.path.join(initramfs, "bin", "busybox"))
    modules, nbd = module_order(glob.glob(os.path.join(work, "root", "lib", "modules", "*"))[0])
    for path in modules + [nbd]:
        shutil.copy(path, os.path.join(initramfs, "modules"))
    with open(os.path.join(initramfs, "modules.order"), "w") as f:
        f.write("\n".join(os.path.basename(p) for p in modules) + "\n")
    with open(os.path.join(initramfs, "init"), "w") as f:
        f.write(GUEST_INIT)
    os.chmod(os.path.join(initramfs, "init"), 0o755)
    with open(os.path.join(work, "initramfs.cpio"), "wb") as out:
        files = subprocess.run("find . | sort", shell=True, cwd=initramfs, capture_output=True, check=True).stdout
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=files, cwd=initramfs, stdout=out, check=True)
    os.replace(os.path.join(work, "vmlinux"), os.path.join(CACHE, "vmlinux"))
    os.replace(os.path.join(work, "initramfs.cpio"), os.path.join(CACHE, "initramfs.cpio"))
    shutil.rmtree(work)
    open(stamp, "w").close()
    log("kernel %s ready in %s" % (package, CACHE))


# With --systemd, the guest's init hands over to systemd, which reaches this
# target: the command as a oneshot unit, and a forced reboot (QEMU exits) after it.
SYSTEMD_TARGET = """[Unit]
Description=Keel VM test
Requires=basic.target keel-vm-test.service
After=basic.target keel-vm-test.service
AllowIsolate=yes
"""
SYSTEMD_SERVICE = """[Unit]
Description=Keel VM test command
After=basic.target
SuccessAction=reboot-force
FailureAction=reboot-force

[Service]
Type=oneshot
ExecStart=/bin/sh {run}/under-systemd.sh
"""


class Guest:
    """A booted guest: its QEMU process and run directory."""

    def __init__(self, process, run_dir, keep):
        self.process, self.run_dir, self.keep = process, run_dir, keep


def start(command, systemd=False, disks=(), run_dir=None, stdout=None):
    """Boots the guest in the background and returns a Guest; its output (the
    command's stdout and stderr) goes to `stdout` (a file; default: ours)."""
    prepare()
    keep = run_dir is not None
    if keep:
        run_dir = os.path.abspath(run_dir)
        os.makedirs(run_dir, exist_ok=True)
    else:
        run_dir = tempfile.mkdtemp(prefix="keel-vm-", dir="/var/tmp")
    os.chmod(run_dir, 0o755)
    with open(os.path.join(run_dir, "command.sh"), "w") as f:
        f.write("set -e\n" + " ".join(shlex.quote(c) for c in command) + "\n")
    if systemd:
        with open(os.path.join(run_dir, "keel-vm-test.target"), "w") as f:
            f.write(SYSTEMD_TARGET)
        with open(os.path.join(run_dir, "keel-vm-test.service"), "w") as f:
            f.write(SYSTEMD_SERVICE.format(run=run_dir))
        with open(os.path.join(run_dir, "under-systemd.sh"), "w") as f:
            f.write("cd {0}\n/bin/sh {0}/command.sh > /dev/ttyS1 2>&1\necho $? > {0}/exit-status\nsync\n"
                    .format(run_dir))
    # The guest learns where its results go from a one-line file appended to the initramfs.
    initramfs = os.path.join(run_dir, "initramfs.cpio")
    extra = os.path.join(run_dir, "extra")
    os.makedirs(extra)
    with open(os.path.join(extra, "run-dir"), "w") as f:
        f.write(run_dir + "\n")
    with open(initramfs, "wb") as out:
        out.write(open(os.path.join(CACHE, "initramfs.cpio"), "rb").read())
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=b"run-dir\n", cwd=extra, stdout=out, check=True)
    shutil.rmtree(extra)
    for name in ("exit-status", "console.log"):  # a kept run directory may hold an earlier boot's
        if os.path.exists(os.path.join(run_dir, name)):
            os.unlink(os.path.join(run_dir, name))
    accel = "kvm" if re.search(r"\b(vmx|svm)\b", open("/proc/cpuinfo").read()) else "tcg,thread=multi"
    qemu = ["qemu-system-x86_64", "-accel", accel, "-cpu", "max", "-smp", "2", "-m", "3G",
            "-kernel", os.path.join(CACHE, "vmlinux"), "-initrd", initramfs,
            "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
            "-display", "none", "-no-reboot", "-nic", "none",
            "-serial", "file:" + os.path.join(run_dir, "console.log"),
            "-chardev", "stdio,id=out,signal=off", "-serial", "chardev:out",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", "local,path=%s,mount_tag=results,security_model=none" % run_dir]
    for disk in disks:
        if "," in disk:
            sys.exit("vm: a disk URI cannot hold a comma: %s" % disk)
        qemu += ["-drive", "file=%s,format=raw,if=virtio,cache=none" % disk]
    process = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=stdout)
    return Guest(process, run_dir, keep)


def wait(guest, timeout):
    """Waits for the guest to end; its command's exit status (124: timed out, 125: no status)."""
    run_dir = guest.run_dir
    try:
        guest.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        guest.process.kill()
        guest.process.wait()
        log("the guest did not finish within %d s; console log: %s" % (timeout, run_dir + "/console.log"))
        return 124
    except BaseException:
        # Stopped itself (SIGTERM, ^C): the guest goes with it, not left running alone.
        guest.process.kill()
        guest.process.wait()
        raise
    status_file = os.path.join(run_dir, "exit-status")
    if not os.path.exists(status_file):
        log("the guest ended without an exit status; console log:")
        console = os.path.join(run_dir, "console.log")
        if os.path.exists(console):  # QEMU may have failed before it made one
            sys.stderr.write(open(console, errors="replace").read()[-4000:])
        return 125
    status = int(open(status_file).read().strip() or "125")
    if not guest.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return status


def run(command, timeout, systemd=False, disks=(), run_dir=None):
    return wait(start(command, systemd, disks, run_dir), timeout)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("prepare")
    runner = sub.add_parser("run")
    runner.add_argument("--timeout", type=int, default=600)
    runner.add_argument("--systemd", action="store_true", help="boot systemd as PID 1 and run COMMAND as a unit")
    runner.add_argument("--disk", action="append", default=[], metavar="URI",
                        help="a virtio disk served over NBD (nbd+unix:///?socket=PATH); repeat for more")
    runner.add_argument("--run-dir", help="the run directory (default: a fresh one, removed on success)")
    runner.add_argument("command", nargs="+")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.action == "prepare":
        prepare()
    else:
        sys.exit(run(args.command, args.timeout, args.systemd, args.disk, args.run_dir))


if __name__ == "__main__":
    main()
