import ArgumentParser
import ControlAPI
import Foundation
import NodeRegistry
import ReplicaIdentity
import Syscalls
import Volumes

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Snapshots of a volume: one point of its write stream, frozen on every replica.",
        discussion: """
            A volume of this node is named by VOL (its engine must be running: attached, or its \
            frontend disabled); a volume whose engine was started by hand by --engine, its control address.
            Examples: keel snapshot create db before-upgrade
                      keel snapshot ls db --json
                      keel snapshot rm db before-upgrade
                      keel snapshot revert db before-upgrade --discard-newer
            """,
        subcommands: [Create.self, List.self, Remove.self, Revert.self, Export.self])

    /// Which engine a snapshot command talks to.
    struct Target: ParsableArguments {
        @Argument(help: "The volume's name.")
        var volume: String

        @Option(help: "The engine's control address, HOST:PORT or unix:/path (default: the engine of this node's volume VOL).")
        var engine: String?

        @Flag(help: "Print JSON.")
        var json = false

        @OptionGroup var node: NodeOptions

        @OptionGroup var control: ControlClientOptions

        /// The engine's control address, once it is known to run.
        func engineControl() throws -> String {
            control.apply()
            if let engine { return engine }
            let node = try Node(self.node)
            let record = try node.volume(volume)
            guard node.attachment(record).engineRunning else {
                throw KeelError("volume \(volume) has no engine running; attach it first (keel volume attach \(volume))")
            }
            return node.engineControl(record.name)
        }

        /// The engine for a job (a backup): `--engine`, the running engine of this node's volume, or,
        /// when the volume is detached, its engine started now with the frontend disabled.
        func engineForJob(timeout: Double) throws -> (control: String, job: JobEngine?) {
            control.apply()
            if let engine { return (engine, nil) }
            let job = try JobEngine(node: try Node(node), volume: volume, timeout: timeout)
            return (job.control, job)
        }

        /// Runs a snapshot call on the engine; the volume's snapshots it answers are kept in the registry.
        func snapshots(doing what: String, through address: String? = nil,
                       _ body: @escaping @Sendable (EngineStub) async throws -> Keel_Control_V1_Snapshots) throws
            -> [Keel_Control_V1_Snapshot] {
            let snapshots = try callEngine(try address ?? engineControl(), doing: what, body).snapshots
            remember(snapshots)
            return snapshots
        }

        /// The registry's copy of a volume of this node (none for `--engine`); a failure to write it changes nothing else.
        func remember(_ snapshots: [Keel_Control_V1_Snapshot]) {
            guard engine == nil, let node = try? Node(node) else { return }
            node.remember(snapshots, of: volume)
        }

        /// For a volume of this node whose engine is not running: the snapshots the registry last saw.
        func lastSeen() throws -> (snapshots: [Keel_Control_V1_Snapshot], seenAt: Int64?)? {
            guard engine == nil else { return nil }
            let node = try Node(self.node)
            let record = try node.volume(volume)
            guard !node.attachment(record).engineRunning else { return nil }
            let (entries, seenAt) = try node.registry.snapshots(of: volume)
            var parent = ""
            let snapshots = entries.map { entry in
                defer { parent = entry.name }
                return Keel_Control_V1_Snapshot.with {
                    $0.name = entry.name; $0.created = entry.created; $0.ownBytes = entry.ownBytes; $0.parent = parent
                }
            }
            return (snapshots, seenAt)
        }
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Take a snapshot: writes are held for the moment each replica freezes its head.",
            discussion: "Refused while a replica is being rebuilt. Example: keel snapshot create db nightly-1")

        @OptionGroup var target: Target

        @Argument(help: "The snapshot's name (default: snap- and the UTC time).")
        var name: String?

        @Option(help: "Freeze this mounted file system (fsfreeze) around the snapshot, for application consistency; on the host that holds the device.")
        var freeze: String?

        func validate() throws {
            if let name, !SnapshotName.isValid(name) {
                throw ValidationError("'\(name)' is not a snapshot name: use \(SnapshotName.rule)")
            }
        }

        func run() throws {
            let name = self.name ?? Self.defaultName()
            let control = try target.engineControl()
            if let freeze {
                do { try FileSystemFreeze.freeze(freeze) } catch {
                    throw KeelError("cannot freeze \(freeze): \(error); is it a mounted file system on this host?")
                }
            }
            let result = Result {
                try callEngine(control, doing: "take snapshot \(name)") { try await $0.createSnapshot(.with { $0.name = name }) }
            }
            if let freeze {
                do { try FileSystemFreeze.thaw(freeze) } catch {
                    throw KeelError("cannot thaw \(freeze): \(error); run 'fsfreeze --unfreeze \(freeze)'")
                }
            }
            let snapshots = try result.get().snapshots
            target.remember(snapshots)
            guard let taken = snapshots.last(where: { $0.name == name }) else {
                throw KeelError("the engine answered without snapshot \(name); see keel snapshot ls \(target.volume)")
            }
            if target.json { return try printJSON(List.json(taken)) }
            print("snapshot \(name) of \(target.volume) taken")
        }

        static func defaultName(_ date: Date = Date()) -> String {
            let format = DateFormatter()
            format.locale = Locale(identifier: "en_US_POSIX")
            format.timeZone = TimeZone(identifier: "UTC")
            format.dateFormat = "yyyyMMdd'T'HHmmss'Z'"
            return "snap-" + format.string(from: date)
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm",
            abstract: "Remove a snapshot online: its data is merged into the next newer layer while I/O goes on.",
            discussion: "Refused while an export or a backup reads it, or a replica is being rebuilt. Example: keel snapshot rm db nightly-1")

        @OptionGroup var target: Target

        @Argument(help: "The snapshot to remove.")
        var name: String

        func validate() throws {
            guard SnapshotName.isValid(name) else {
                throw ValidationError("'\(name)' is not a snapshot name: use \(SnapshotName.rule)")
            }
        }

        func run() throws {
            let snapshots = try target.snapshots(doing: "remove snapshot \(name)") {
                try await $0.removeSnapshot(.with { $0.name = name })
            }
            if target.json { return try printJSON(snapshots.map(List.json)) }
            print("snapshot \(name) of \(target.volume) removed")
        }
    }

    struct Revert: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make the volume read as a snapshot again: its head (what was written since) is discarded.",
            discussion: """
                Only while the volume is detached (its engine running with the frontend disabled) and no \
                client is connected. Snapshots newer than NAME must be removed first, or --discard-newer \
                removes them. Example: keel snapshot revert db before-upgrade
                """)

        @OptionGroup var target: Target

        @Argument(help: "The snapshot to revert to.")
        var name: String

        @Flag(help: "Also remove the snapshots newer than NAME.")
        var discardNewer = false

        func validate() throws {
            guard SnapshotName.isValid(name) else {
                throw ValidationError("'\(name)' is not a snapshot name: use \(SnapshotName.rule)")
            }
        }

        func run() throws {
            let snapshots = try target.snapshots(doing: "revert to snapshot \(name)") {
                try await $0.revertSnapshot(.with { $0.name = name; $0.discardNewer = discardNewer })
            }
            if target.json { return try printJSON(snapshots.map(List.json)) }
            print("volume \(target.volume) reverted to snapshot \(name)")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ls", abstract: "List a volume's snapshots, oldest first.")

        @OptionGroup var target: Target

        func run() throws {
            let snapshots: [Keel_Control_V1_Snapshot]
            if let (seen, seenAt) = try target.lastSeen() {
                // No engine to ask: the registry's copy, saying so on stderr.
                let when = seenAt.map { "as last seen at " + Self.time($0) } ?? "none seen yet"
                FileHandle.standardError.write(Data("volume \(target.volume) has no engine running: its snapshots \(when)\n".utf8))
                snapshots = seen
            } else {
                snapshots = try target.snapshots(doing: "list its snapshots") { try await $0.listSnapshots(.init()) }
            }
            if target.json { return try printJSON(snapshots.map(Self.json)) }
            guard !snapshots.isEmpty else {
                return print("volume \(target.volume) has no snapshot; take one with 'keel snapshot create \(target.volume)'")
            }
            let width = max(4, snapshots.map(\.name.count).max() ?? 0)
            print("NAME".padding(toLength: width, withPad: " ", startingAt: 0) + "  CREATED (UTC)         OWN DATA    PARENT")
            for snapshot in snapshots {
                print(snapshot.name.padding(toLength: width, withPad: " ", startingAt: 0)
                    + "  " + Self.time(snapshot.created).padding(toLength: 20, withPad: " ", startingAt: 0)
                    + "  " + humanSize(snapshot.ownBytes).padding(toLength: 10, withPad: " ", startingAt: 0)
                    + "  " + (snapshot.parent.isEmpty ? "-" : snapshot.parent))
            }
        }

        static func json(_ snapshot: Keel_Control_V1_Snapshot) -> [String: Any] {
            ["name": snapshot.name, "created": time(snapshot.created), "created_unix": snapshot.created,
             "own_bytes": snapshot.ownBytes, "parent": snapshot.parent.isEmpty ? NSNull() : snapshot.parent]
        }

        static func time(_ seconds: Int64) -> String {
            let format = ISO8601DateFormatter()
            return format.string(from: Date(timeIntervalSince1970: TimeInterval(seconds)))
        }
    }
}

extension Node {
    /// Keeps the engine's answer in the registry, for `keel snapshot ls` while the engine is not running.
    func remember(_ snapshots: [Keel_Control_V1_Snapshot], of volume: String) {
        try? registry.setSnapshots(snapshots.map { SnapshotEntry(name: $0.name, created: $0.created, ownBytes: $0.ownBytes) },
                                   of: volume, seenAt: Int64(Date().timeIntervalSince1970))
    }
}
