import ArgumentParser
import Foundation
import NodeRegistry
import Syscalls
import Volumes

extension Volume {
    /// `keel volume move`: the volume's replicas to a new set, online.
    struct Move: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Move a volume's replicas to a new set while it stays attached (or attachable).",
            discussion: """
                The options name the volume's new full set of replicas. Those not in the volume yet are \
                started (on the nodes named) and rebuilt online one after another while the volume \
                serves; then the replicas not in the set leave the volume and their data is deleted. \
                There is no confirm step. Runs until the move ends, with a progress bar on a terminal \
                (JSON lines with --json); SIGINT or SIGTERM cancels it, as does \
                'keel volume move VOL --cancel' from another shell. A detached volume's engine runs \
                for the move with no device; 'keel volume attach' meanwhile takes it over.
                Follow it from elsewhere with 'keel migrate status VOL'.
                Examples: keel volume move db --replica-node d --replica-node e --replica-node f
                          keel volume move db --cancel
                """)

        @Argument(help: "The volume's name.")
        var name: String

        @Option(name: .customLong("replica-node"), help: ArgumentHelp("A node to hold one of the new set's replicas, by the name 'keel node add' gave it (repeat for each); a node that holds one of the volume's replicas keeps it.", valueName: "name"))
        var replicaNodes: [String] = []

        @Option(name: .customLong("replica"), help: ArgumentHelp("A replica of the new set by data address, HOST:PORT or unix:/path (repeat for each): one of the volume's keeps its place, another must already serve (keel replica serve --size SIZE).", valueName: "address"))
        var replicaAddresses: [String] = []

        @Flag(help: "Stop the running move: the new replicas are removed, the old set stays (a move that was already removing the old replicas is finished instead).")
        var cancel = false

        @Flag(help: "Print progress and the result as JSON lines.")
        var json = false

        @OptionGroup var node: NodeOptions

        @OptionGroup var control: ControlClientOptions

        func validate() throws {
            if cancel && !(replicaNodes.isEmpty && replicaAddresses.isEmpty) {
                throw ValidationError("--cancel takes no --replica-node or --replica")
            }
        }

        func run() throws {
            TerminationSignals.block()
            let node = try Node(self.node)
            if cancel { return try cancelMove(node) }
            let move = try ReplicaMove.start(ReplicaMoveRequest(volume: name, nodes: replicaNodes, addresses: replicaAddresses),
                                             node: node, credentials: control.credentials)
            if !json {
                print("move of \(name)'s replicas to \(move.record.target) started; follow it with 'keel migrate status \(name)'")
            }
            try follow(move)
        }

        private func cancelMove(_ node: Node) throws {
            _ = try node.volume(name)
            if let move = try ReplicaMove.takeOver(volume: name, node: node, credentials: control.credentials) {
                if !json { print("the move of \(name) was interrupted (its process is gone); ending it here") }
                return try follow(move)
            }
            guard try node.registry.requestCancel(of: name), let running = try node.runningMigration(of: name) else {
                throw KeelError("no move of \(name) is running; see 'keel migrate status \(name)'")
            }
            if !json { print("cancel of the move of \(name) asked; waiting for it to end") }
            // The move answers within a status poll, then undoes what it added (bounded by its engine calls).
            let deadline = Date().addingTimeInterval(600)
            var last = running
            while Date() < deadline, let record = try node.registry.migration(of: name), record.startedAt == running.startedAt {
                last = record
                if !record.status.isRunning || !node.isAlive(record) { break }
                usleep(200_000)
            }
            try report(last)
        }

        private func follow(_ move: ReplicaMove) throws {
            var progress = MigrationProgress(json: json)
            move.interrupted = { TerminationSignals.arePending }
            var pausedOnce = false
            move.onProgress = { record in
                progress.show(record)
                // Holds the mover (not the engine's copy) once it copies, for the kernel suite's attach and detach.
                if !pausedOnce && record.phase.hasPrefix("copying") && record.bytesDone > 0 {
                    pausedOnce = true
                    try? TestPausePoint.pause(at: "move-copy", until: Date().addingTimeInterval(600))
                }
            }
            let record = move.run()
            progress.finish()
            try report(record)
        }

        private func report(_ record: MigrationRecord) throws {
            if json { print(MigrationProgress.line(record)) }
            switch record.status {
            case .success:
                if !json { print("volume \(name) moved to \(record.target)" + (record.error.isEmpty ? "" : "; \(record.error)")) }
            case .error where record.phase == "cancelled":
                if !json { print("move of \(name) cancelled; the volume keeps its old replicas") }
            default:
                throw KeelError("the move of \(name) failed: \(record.error)")
            }
        }
    }
}

extension Node {
    func isAlive(_ record: MigrationRecord) -> Bool { (try? runningMigration(of: record.volume)) != nil }
}
