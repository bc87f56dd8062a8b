import ArgumentParser
import ControlAPI
import Foundation
import Syscalls
import Volumes

extension Replica {
    /// `keel replica add`: new (or stale) replicas join a running volume and are rebuilt.
    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Add replicas to a running volume and rebuild them online.",
            discussion: """
                Each replica (started with `keel replica serve`, empty or stale) joins in WO mode: it
                receives the writes behind the copy while the engine copies the volume to it from a
                healthy replica; then it becomes RW. Several replicas named together are rebuilt in one
                pass (each region read once for all); one that fails is dropped alone. Shows a progress
                bar on a terminal.
                Example: keel replica add --engine 127.0.0.1:7900 127.0.0.1:7004 127.0.0.1:7005
                """)

        @Option(help: "The engine's control address, HOST:PORT or unix:/path (its --control).")
        var engine: String

        @OptionGroup var control: ControlClientOptions

        @Argument(help: "The replicas' data addresses, HOST:PORT or unix:/path.")
        var replicas: [String]

        @Flag(help: "Print progress and the result as JSON lines.")
        var json = false

        @Flag(help: "Return as soon as the rebuild has started.")
        var noWait = false

        func run() throws {
            control.apply()
            let texts = try replicas.map { "\(try parseListenAddress($0, option: "REPLICA"))" }
            var status = try callEngine(engine, doing: "add \(texts.joined(separator: ", "))") {
                try await $0.addReplica(.with { $0.address = texts[0]; $0.togetherWith = Array(texts.dropFirst()) })
            }
            var progress = RebuildProgress(json: json)
            progress.show(status, replicas: texts)
            if noWait { return progress.finish(status, replicas: texts) }
            // A rebuild moves at disk speed; one status call per second is plenty.
            while texts.contains(where: { status.replica($0)?.mode == "WO" }) {
                Thread.sleep(forTimeInterval: progress.interval)
                status = try callEngine(engine, doing: "report its status") { try await $0.status(.init()) }
                progress.show(status, replicas: texts)
            }
            progress.finish(status, replicas: texts)
            let failed = texts.filter { status.replica($0)?.mode != "RW" }.map { text in
                "\(text): \(status.replica(text)?.error ?? "it left the volume")"
            }
            guard failed.isEmpty else { throw KeelError("the rebuild failed for \(failed.joined(separator: "; "))") }
        }
    }

    /// `keel replica rm`: a replica leaves the volume for good.
    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm",
            abstract: "Take a replica out of a running volume (refused for its last healthy replica).",
            discussion: "Example: keel replica rm --engine 127.0.0.1:7900 127.0.0.1:7002")

        @Option(help: "The engine's control address, HOST:PORT or unix:/path (its --control).")
        var engine: String

        @OptionGroup var control: ControlClientOptions

        @Argument(help: "The replica's data address, as the engine shows it.")
        var replica: String

        func run() throws {
            control.apply()
            let text = "\(try parseListenAddress(replica, option: "REPLICA"))"
            let status = try callEngine(engine, doing: "remove \(text)") {
                try await $0.removeReplica(.with { $0.address = text })
            }
            print("replica \(text) removed; volume \(status.volume) is \(Status.health(status))")
        }
    }
}

/// How `keel replica add` shows a rebuild: a bar on a terminal, JSON lines with
/// `--json`, a line per 10% otherwise.
struct RebuildProgress {
    let json: Bool
    let terminal = isatty(STDOUT_FILENO) == 1
    private var lastTenth = -1

    init(json: Bool) { self.json = json }

    var interval: TimeInterval { terminal && !json ? 0.25 : 1 }

    mutating func show(_ status: Keel_Control_V1_EngineStatus, replicas: [String]) {
        let states = replicas.compactMap { status.replica($0) }
        guard !states.isEmpty else { return }
        // A replica that failed stops moving: the bar follows those still copying.
        let fraction = states.filter { ["WO", "RW"].contains($0.mode) }.map { $0.mode == "RW" ? 1 : $0.rebuildProgress }.min() ?? 1
        let named = replicas.joined(separator: ", ")
        if json {
            for state in states { print(line(state, fraction: state.mode == "RW" ? 1 : state.rebuildProgress)) }
        } else if terminal {
            let width = 40, filled = Int(fraction * Double(width))
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            let modes = Set(states.map(\.mode)).sorted().joined(separator: "/")
            print("\rrebuilding \(named) [\(bar)] \(Int(fraction * 100))% \(modes)", terminator: "")
            fflush(stdout)
        } else if Int(fraction * 10) > lastTenth {
            lastTenth = Int(fraction * 10)
            for state in states {
                let own = state.mode == "RW" ? 1 : state.rebuildProgress
                print("rebuilding \(state.address): \(Int(own * 100))% (\(state.rebuiltBytes) of \(status.size) bytes), \(state.mode)")
            }
        }
    }

    func finish(_ status: Keel_Control_V1_EngineStatus, replicas: [String]) {
        if terminal && !json { print("") }
        guard !json else { return }
        for replica in replicas {
            guard let state = status.replica(replica) else { continue }
            print("replica \(replica) is \(state.mode); volume \(status.volume) is \(Status.health(status))")
        }
    }

    private func line(_ state: Keel_Control_V1_ReplicaState, fraction: Double) -> String {
        let object: [String: Any] = ["replica": state.address, "id": state.id, "mode": state.mode,
                                     "rebuild_progress": fraction, "rebuilt_bytes": state.rebuiltBytes,
                                     "error": state.error]
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data()
        return String(decoding: data, as: UTF8.self)
    }
}

extension Keel_Control_V1_EngineStatus {
    /// The newest entry for a data address (an address re-added after a failure has two).
    func replica(_ address: String) -> Keel_Control_V1_ReplicaState? {
        replicas.last { $0.address == address }
    }
}
