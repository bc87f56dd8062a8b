import Foundation
import DeviceFrontend
import NodeRegistry
import Syscalls
import Testing
import Volumes

/// The volume orchestration called as a library, without the CLI: the
/// daemons it starts are real `keel` processes (this host has no NBD driver,
/// so attach stops at the kernel, as the CLI's does).
@Suite(.serialized) struct VolumeLibraryTests {
    let scratch: Scratch
    let node: Node
    let none = ControlCredentials()

    init() throws {
        scratch = try Scratch()
        node = try Node(layout: NodeLayout(stateDirectory: scratch.file("state")), executable: Paths.keel)
    }

    func runningReplicas(_ volume: VolumeRecord) -> [Bool] {
        node.localReplicas(volume).map { node.runner(volume.runner).isRunning($0.daemon) }
    }

    @Test func aVolumeIsCreatedAndRemoved() throws {
        let created = try node.createVolume(VolumeSpec(name: "lib", size: 16 << 20, replicas: 2), credentials: none)
        #expect(created.replicas.count == 2 && created.replicas.allSatisfy(\.isLocal))
        #expect(try node.registry.volume(named: "lib") == created)
        #expect(runningReplicas(created) == [true, true])
        #expect(node.attachment(created).summary == "detached")

        #expect(try node.removeVolume("lib", credentials: none) == 0)
        #expect(try node.registry.volume(named: "lib") == nil)
        #expect(runningReplicas(created) == [false, false])
        #expect(!FileManager.default.fileExists(atPath: node.layout.volumeDataDirectory("lib")))
    }

    @Test func aBadSpecIsOneLineAndCreatesNothing() throws {
        let unaligned = #expect(throws: KeelError.self) {
            try node.createVolume(VolumeSpec(name: "lib", size: 1000), credentials: none)
        }
        #expect(unaligned?.message.contains("4 KiB") == true)
        let unknown = #expect(throws: KeelError.self) {
            try node.createVolume(VolumeSpec(name: "lib", size: 16 << 20, replicaNodes: ["nosuch"]), credentials: none)
        }
        #expect(unknown?.message.contains("keel node add nosuch") == true, "\(String(describing: unknown))")
        #expect(try node.registry.volumes().isEmpty)
        #expect(!FileManager.default.fileExists(atPath: node.layout.volumeDataDirectory("lib")))
    }

    /// The device frontend's restarts of a local engine: a dead one is started
    /// again, a hung one (stopped, its control API silent) killed first.
    @Test func theLocalEngineIsStartedAgainAndAHungOneKilledFirst() throws {
        let volume = try node.createVolume(VolumeSpec(name: "lib", size: 16 << 20, replicas: 1), credentials: none)
        defer { _ = try? node.removeVolume("lib", credentials: none) }
        let runner = node.runner(volume.runner)
        let engine = node.engineDaemon(volume)
        let place = LocalPlace(runner: runner, engine: engine, socket: node.layout.engineSocket("lib"),
                               control: node.layout.engineControl("lib"))
        let spec = EngineSpec(volume: "lib", volumeID: volume.id, size: volume.size, replicas: [], port: 0, replicaTimeout: 0)
        try runner.start(engine)
        defer { try? runner.stop(engine) }

        let found = try place.startEngine(spec, restartRunning: false, CancellableCalls())
        #expect(found.alreadyRunning && found.endpoint.address == SocketAddress.unix(path: node.layout.engineSocket("lib")), "\(found)")

        let first = try enginePid()
        kill(first, SIGSTOP)
        defer { kill(first, SIGKILL) }
        let restarted = try place.startEngine(spec, restartRunning: false, CancellableCalls())
        #expect(!restarted.alreadyRunning && restarted.detail.contains("control API"), "\(restarted)")
        #expect(try enginePid() != first)

        try runner.killNow(engine)
        let again = try place.startEngine(spec, restartRunning: false, CancellableCalls())
        #expect(!again.alreadyRunning && again.detail.isEmpty)
        #expect(runner.isRunning(engine))
    }

    func enginePid() throws -> pid_t {
        let found = try run(["/usr/bin/pgrep", "-f", "engine serve --volume lib .*\(scratch.path)"])
        let pids = found.stdout.split(separator: "\n").compactMap { pid_t($0) }
        try #require(pids.count == 1, "engines: \(found.stdout)")
        return pids[0]
    }

    @Test func anAttachThatCannotReachTheKernelLeavesNoEngineAndDetachSaysSo() throws {
        let volume = try node.createVolume(VolumeSpec(name: "lib", size: 16 << 20, replicas: 1), credentials: none)
        let refused = #expect(throws: KeelError.self) { try node.attach("lib", timeout: 10, credentials: none) }
        #expect(refused?.message.contains("modprobe nbd") == true, "\(String(describing: refused))")
        #expect(!node.runner(volume.runner).isRunning(node.engineDaemon(volume)))
        #expect(!node.runner(volume.runner).isRunning(node.frontendDaemon(volume)))
        let detached = try node.detach("lib", credentials: none)
        #expect(detached.device == nil && detached.result == "was not attached")
        try node.removeVolume("lib", credentials: none)
    }
}
