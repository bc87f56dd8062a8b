import ArgumentParser
import Foundation
import NodeRegistry

extension Volume {
    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm",
            abstract: "Remove a detached volume: stop its local replicas and delete their data.",
            discussion: "Replicas elsewhere (--replica at create) keep their data.\nExample: keel volume rm db")

        @OptionGroup var target: VolumeTarget

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            let node = try Node(target.node)
            try node.lock(target.name)
            let volume = try node.volume(target.name)
            let attachment = node.attachment(volume)
            if let device = attachment.device {
                throw CLIError("volume \(target.name) is attached as \(device); unmount it and run 'keel volume detach \(target.name)' first")
            }
            if attachment.engineRunning {
                throw CLIError("volume \(target.name)'s engine is running; stop it with 'keel volume detach \(target.name)' first")
            }
            if volume.enginePlacedElsewhere {
                if let running = RemoteEngines(volume: volume, node: node, control: control).states().first(where: { $0.running == true }) {
                    throw CLIError("volume \(target.name)'s engine is running on node \(running.node); stop it with 'keel volume detach \(target.name)' first")
                }
            }
            do { try removeLocalReplicas(volume, node: node) } catch {
                throw CLIError("cannot remove the replicas of \(target.name): \(error); the volume stays registered, try again")
            }
            // A frontend that outlived its device (it waits for an engine) goes too.
            let runner = node.runner(volume.runner)
            try? runner.stop(node.frontendDaemon(volume))
            runner.forget(node.frontendDaemon(volume))
            runner.forget(node.engineDaemon(volume))
            do { try node.registry.remove(named: target.name) } catch { throw CLIError("\(error)") }
            let remote = volume.replicas.filter { !$0.isLocal }.count
            let note = remote > 0 ? "; \(remote) replica(s) elsewhere keep their data" : ""
            if target.json { return try printJSON(["volume": target.name, "removed": true, "remote_replicas_kept": remote] as [String: Any]) }
            print("volume \(target.name) removed\(note)")
        }
    }
}

/// Stops the volume's local replicas, forgets their daemons and deletes their data.
func removeLocalReplicas(_ volume: VolumeRecord, node: Node) throws {
    let runner = node.runner(volume.runner)
    for (daemon, _) in node.localReplicas(volume) {
        try runner.stop(daemon)
        runner.forget(daemon)
    }
    let directory = node.layout.volumeDataDirectory(volume.name)
    if FileManager.default.fileExists(atPath: directory) { try FileManager.default.removeItem(atPath: directory) }
}
