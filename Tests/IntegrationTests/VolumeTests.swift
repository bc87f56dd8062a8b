import Foundation
import Syscalls
import Testing

/// `keel volume …` on this host: the registry, the daemons keel runs itself,
/// and every refusal. This host has no NBD driver, so attaching is proven in
/// the kernel suite (volume-lifecycle.sh); here it must fail cleanly.
@Suite(.serialized) struct VolumeTests {
    let scratch: Scratch
    let state: String

    init() throws {
        scratch = try Scratch()
        state = scratch.file("state")
    }

    func keel(_ arguments: [String]) throws -> Finished {
        try run([Paths.keel, "volume"] + arguments + ["--state-dir", state])
    }

    func json(_ arguments: [String]) throws -> Any {
        let result = try keel(arguments + ["--json"])
        #expect(result.status == 0, "\(arguments): \(result.stderr)")
        return try JSONSerialization.jsonObject(with: Data(result.stdout.utf8))
    }

    /// One line on stderr that mentions `words`, a non-zero exit, nothing on stdout.
    func expectRefusal(_ arguments: [String], mentioning words: [String]) throws {
        let result = try keel(arguments)
        #expect(result.status != 0, "\(arguments) succeeded")
        #expect(result.stderr.split(separator: "\n").count == 1, "\(arguments): \(result.stderr)")
        for word in words { #expect(result.stderr.contains(word), "\(arguments): \(result.stderr)") }
        #expect(result.stdout.isEmpty)
    }

    func keelProcesses(mentioning text: String) throws -> [String] {
        try run(["pgrep", "-af", "keel (replica|engine) serve"]).stdout
            .split(separator: "\n").map(String.init).filter { $0.contains(text) }
    }

    @Test func createListShowAndRemoveLocalReplicas() throws {
        let created = try json(["create", "vol1", "--size", "64M", "--replicas", "2"]) as? [String: Any]
        #expect(created?["size"] as? Int == 64 << 20)
        #expect(created?["state"] as? String == "detached")
        let replicas = created?["replicas"] as? [[String: Any]] ?? []
        #expect(replicas.count == 2)
        #expect(replicas.allSatisfy { $0["local"] as? Bool == true && $0["running"] as? Bool == true })
        #expect(try keelProcesses(mentioning: state + "/replicas/vol1/").count == 2)

        let listed = try json(["ls"]) as? [[String: Any]]
        #expect(listed?.map { $0["name"] as? String } == ["vol1"])
        let table = try keel(["ls"])
        #expect(table.stdout.contains("vol1") && table.stdout.contains("64 MiB") && table.stdout.contains("detached"))
        let shown = try keel(["show", "vol1"])
        #expect(shown.status == 0 && shown.stdout.contains("running"), "\(shown.stderr)")

        try expectRefusal(["create", "vol1", "--size", "64M"], mentioning: ["already exists", "keel volume rm vol1"])

        let removed = try json(["rm", "vol1"]) as? [String: Any]
        #expect(removed?["removed"] as? Bool == true)
        #expect(try keelProcesses(mentioning: state + "/replicas/vol1/").isEmpty)
        #expect(!FileManager.default.fileExists(atPath: state + "/replicas/vol1"))
        #expect((try json(["ls"]) as? [Any])?.isEmpty == true)
    }

    @Test func attachWithoutTheDriverLeavesNothingBehind() throws {
        #expect(try keel(["create", "vol2", "--size", "16M", "--replicas", "1"]).status == 0)
        defer { _ = try? keel(["rm", "vol2"]) }
        try expectRefusal(["attach", "vol2"], mentioning: ["modprobe nbd"])
        #expect(try keelProcesses(mentioning: "engine serve --volume vol2").isEmpty)
        let shown = try json(["show", "vol2"]) as? [String: Any]
        #expect(shown?["state"] as? String == "detached")
        #expect(shown?["engine_running"] as? Bool == false)
    }

    @Test func unknownVolumesAndBadArgumentsGetOneLine() throws {
        for command in ["attach", "detach", "show", "rm"] {
            try expectRefusal([command, "ghost"], mentioning: ["no volume named 'ghost'", "keel volume ls"])
        }
        try expectRefusal(["create", "a/b", "--size", "1G"], mentioning: ["volume name"])
        try expectRefusal(["create", "odd", "--size", "1000"], mentioning: ["multiple of 4 KiB"])
        try expectRefusal(["create", "many", "--size", "1G", "--replicas", "17"], mentioning: ["1 to 16 replicas"])
        try expectRefusal(["attach", "x", "--device", "/dev/sda"], mentioning: ["/dev/nbd0"])
        #expect((try json(["ls"]) as? [Any])?.isEmpty == true)
    }

    @Test func anUnwritableStateDirectorySaysWhatToDo() throws {
        let result = try run([Paths.keel, "volume", "ls", "--state-dir", "/proc/keel/state"])
        #expect(result.status != 0)
        #expect(result.stderr.contains("cannot create /proc/keel") && result.stderr.contains("--state-dir"))
    }

    @Test func remoteReplicasAreCheckedAndKeptOnRemove() throws {
        let replica = try KeelServer(["replica", "serve", "--dir", scratch.file("remote"), "--size", "32M"],
                                     scratch: scratch)
        try expectRefusal(["create", "far", "--size", "64M", "--replica", replica.address],
                          mentioning: ["holds 33554432 bytes, not 67108864"])
        try expectRefusal(["create", "far", "--size", "32M", "--replica", "unix:" + scratch.file("nobody.sock")],
                          mentioning: ["cannot reach replica", "keel replica serve --size"])
        let created = try json(["create", "far", "--size", "32M", "--replica", replica.address]) as? [String: Any]
        #expect((created?["replicas"] as? [[String: Any]])?.first?["local"] as? Bool == false)
        let removed = try json(["rm", "far"]) as? [String: Any]
        #expect(removed?["remote_replicas_kept"] as? Int == 1)
        #expect(FileManager.default.fileExists(atPath: scratch.file("remote") + "/replica.sqlite"))
    }

    /// An engine that is not this node's (another host, or started by hand) holds the volume's replicas.
    @Test func attachRefusesAVolumeInUseByALiveEngine() throws {
        #expect(try keel(["create", "busy", "--size", "16M", "--replicas", "2"]).status == 0)
        defer { _ = try? keel(["rm", "busy"]) }
        let engine = try KeelServer(["engine", "serve", "--volume", "busy", "--size", "16M",
                                     "--replica", "unix:\(state)/run/busy-r0.sock",
                                     "--replica", "unix:\(state)/run/busy-r1.sock"], scratch: scratch)
        try expectRefusal(["attach", "busy"], mentioning: ["attached elsewhere", "--force"])
        #expect(try keelProcesses(mentioning: "engine serve --volume busy --size 16777216").isEmpty)
        engine.stop()
        // With the engine gone only the missing driver stands in the way.
        try expectRefusal(["attach", "busy"], mentioning: ["modprobe nbd"])
    }
}
