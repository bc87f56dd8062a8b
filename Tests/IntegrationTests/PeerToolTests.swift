import Foundation
import Testing

/// The NBD tools people actually use, pointed at `keel export`.
@Suite(.serialized) struct PeerToolTests {
    /// Debian's nbdsh is python3 -m nbd; find Debian's python3 before any other.
    static let debianPath = "PATH=/usr/bin:/bin:/usr/sbin:/sbin"

    @Test func nbdinfoDescribesTheExport() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 48 << 20), scratch: scratch, extra: ["--name", "vol"])
        let info = try run(["nbdinfo", "--json", server.uri.replacingOccurrences(of: ":///?", with: ":///vol?")])
        #expect(info.status == 0, "\(info.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as! [String: Any]
        let export = (json["exports"] as! [[String: Any]])[0]
        #expect(export["export-size"] as? Int == 48 << 20)
        #expect(export["can_multi_conn"] as? Bool == true)
        #expect(export["block_size_preferred"] as? Int == 4096)
        let list = try run(["nbdinfo", "--list", server.uri])
        #expect(list.status == 0 && list.stdout.contains("export=\"vol\""), "\(list.stdout)")
    }

    @Test func nbdshScriptReadsWritesAndZeroes() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 8 << 20), scratch: scratch)
        let script = """
            import hashlib
            data = bytes(range(256)) * 4096
            h.pwrite(data, 12345)
            assert h.pread(len(data), 12345) == data
            h.zero(1000, 20000, nbd.CMD_FLAG_NO_HOLE)
            assert h.pread(1000, 20000) == bytes(1000)
            h.flush()
            print("sha256", hashlib.sha256(h.pread(8 << 20, 0)).hexdigest())
            """
        let result = try run(["/usr/bin/env", Self.debianPath, "nbdsh", "-u", server.uri, "-c", script])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.hasPrefix("sha256 "))
        #expect(server.stop() == 0)
        let onDisk = try run(["sha256sum", scratch.file("disk.img")])
        #expect(onDisk.stdout.split(separator: " ").first.map(String.init) == result.stdout.split(separator: " ").last?.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    @Test func nbdcopyRoundTrip() throws {
        let scratch = try Scratch()
        let source = scratch.file("source.img")
        #expect(try run(["dd", "if=/dev/urandom", "of=\(source)", "bs=1M", "count=32", "status=none"]).status == 0)
        let server = try KeelServer(image: try scratch.image(size: 32 << 20), scratch: scratch)
        #expect(try run(["nbdcopy", source, server.uri]).status == 0)
        let back = scratch.file("back.img")
        #expect(try run(["nbdcopy", server.uri, back]).status == 0)
        #expect(try run(["cmp", source, back]).status == 0)
    }

    @Test func qemuImgConvertAndCompare() throws {
        let scratch = try Scratch()
        let source = scratch.file("source.img")
        #expect(try run(["dd", "if=/dev/urandom", "of=\(source)", "bs=1M", "count=16", "seek=8", "status=none"]).status == 0)
        let server = try KeelServer(image: try scratch.image(size: 24 << 20), scratch: scratch)
        let convert = try run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, server.uri])
        #expect(convert.status == 0, "\(convert.stderr)")
        let compare = try run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, server.uri])
        #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
        let back = scratch.file("back.qcow2")
        #expect(try run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", server.uri, back]).status == 0)
        #expect(try run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, back]).status == 0)
    }

    /// fio's nbd engine (libnbd), random mixed I/O at depth 32 with crc32c
    /// verification: 512 MiB written and 512 MiB read back and checked.
    @Test func fioVerifyMovesOneGibibyte() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 512 << 20), scratch: scratch)
        let fio = try run(["fio", "--name=verify", "--ioengine=nbd", "--uri=\(server.uri)", "--rw=randwrite",
                           "--bsrange=4k-256k", "--iodepth=32", "--size=512M", "--verify=crc32c",
                           "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"], timeout: 600)
        #expect(fio.status == 0, "\(fio.stderr)")
        let json = try JSONSerialization.jsonObject(with: Data(fio.stdout[fio.stdout.firstIndex(of: "{")!...].utf8)) as! [String: Any]
        let job = (json["jobs"] as! [[String: Any]])[0]
        #expect(job["error"] as? Int == 0)
        let written = (job["write"] as! [String: Any])["io_bytes"] as! Int
        let read = (job["read"] as! [String: Any])["io_bytes"] as! Int
        #expect(written >= 512 << 20 && read >= 512 << 20)
        #expect(server.stop() == 0)
    }

    @Test func fioUnalignedVerify() throws {
        let scratch = try Scratch()
        let server = try KeelServer(image: try scratch.image(size: 64 << 20), scratch: scratch)
        let fio = try run(["fio", "--name=odd", "--ioengine=nbd", "--uri=\(server.uri)", "--rw=randwrite",
                           "--bsrange=512-12k", "--blockalign=512", "--iodepth=16", "--size=64M",
                           "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"], timeout: 600)
        #expect(fio.status == 0, "\(fio.stdout)\(fio.stderr)")
    }
}
