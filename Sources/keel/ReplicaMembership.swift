import ArgumentParser
import ControlAPI
import Foundation
import Syscalls
import Volumes

extension Replica {
    /// `keel replica add`: a new (or stale) replica joins a running volume and is rebuilt.
    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Add a replica to a running volume and rebuild it online.",
            discussion: """
                The replica (started with `keel replica serve`, empty or stale) joins in WO mode: it
                receives every new write at once while the engine copies the volume to it from a
                healthy replica; then it becomes RW. Shows a progress bar on a terminal.
                Example: keel replica add --engine 127.0.0.1:7900 127.0.0.1:7004
                """)

        @Option(help: "The engine's control address, HOST:PORT or unix:/path (its --control).")
        var engine: String

        @OptionGroup var control: ControlClientOptions

        @Argument(help: "The replica's data address, HOST:PORT or unix:/path.")
        var replica: String

        @Flag(help: "Print progress and the result as JSON lines.")
        var json = false

        @Flag(help: "Return as soon as the rebuild has started.")
        var noWait = false

        func run() throws {
            control.apply(for: engine)
            let address = try parseListenAddress(replica, option: "REPLICA")
            let text = "\(address)"
            var status = try callEngine(engine, doing: "add \(text)") {
                try await $0.addReplica(.with { $0.address = text })
            }
            var progress = RebuildProgress(json: json)
            progress.show(status, replica: text)
            if noWait { return progress.finish(status, replica: text) }
            // A rebuild moves at disk speed; one status call per second is plenty.
            while let state = status.replicas.last(where: { $0.address == text }), state.mode == "WO" {
                Thread.sleep(forTimeInterval: progress.interval)
                status = try callEngine(engine, doing: "report its status") { try await $0.status(.init()) }
                progress.show(status, replica: text)
            }
            progress.finish(status, replica: text)
            guard status.replicas.last(where: { $0.address == text })?.mode == "RW" else {
                let reason = status.replicas.last(where: { $0.address == text })?.error ?? "it left the volume"
                throw KeelError("the rebuild of \(text) failed: \(reason)")
            }
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
            control.apply(for: engine)
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

    mutating func show(_ status: Keel_Control_V1_EngineStatus, replica: String) {
        guard let state = status.replicas.last(where: { $0.address == replica }) else { return }
        let fraction = state.mode == "RW" ? 1 : state.rebuildProgress
        if json {
            print(line(state, fraction: fraction))
        } else if terminal {
            let width = 40, filled = Int(fraction * Double(width))
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            print("\rrebuilding \(replica) [\(bar)] \(Int(fraction * 100))% \(state.mode)", terminator: "")
            fflush(stdout)
        } else if Int(fraction * 10) > lastTenth {
            lastTenth = Int(fraction * 10)
            print("rebuilding \(replica): \(Int(fraction * 100))% (\(state.rebuiltBytes) of \(status.size) bytes), \(state.mode)")
        }
    }

    func finish(_ status: Keel_Control_V1_EngineStatus, replica: String) {
        if terminal && !json { print("") }
        guard !json, let state = status.replicas.last(where: { $0.address == replica }) else { return }
        print("replica \(replica) is \(state.mode); volume \(status.volume) is \(Status.health(status))")
    }

    private func line(_ state: Keel_Control_V1_ReplicaState, fraction: Double) -> String {
        let object: [String: Any] = ["replica": state.address, "id": state.id, "mode": state.mode,
                                     "rebuild_progress": fraction, "rebuilt_bytes": state.rebuiltBytes,
                                     "error": state.error]
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data()
        return String(decoding: data, as: UTF8.self)
    }
}
