import ArgumentParser
import Foundation
import NodeRegistry
import Volumes

extension Volume {
    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm",
            abstract: "Remove a detached volume: stop its replicas (here and on the nodes it placed them on) and delete their data.",
            discussion: "Replicas placed on other nodes (--replica-node) are removed through their agents; replicas given by address (--replica) keep their data.\nExample: keel volume rm db")

        @OptionGroup var target: VolumeTarget

        @Flag(help: "Remove the volume even when a node holding one of its replicas does not answer (that replica's data stays there).")
        var force = false

        @OptionGroup var control: ControlClientOptions

        func run() throws {
            let node = try Node(target.node)
            let kept = try node.removeVolume(target.name, force: force, credentials: control.credentials)
            if target.json { return try printJSON(["volume": target.name, "removed": true, "remote_replicas_kept": kept] as [String: Any]) }
            print("volume \(target.name) removed" + (kept > 0 ? "; \(kept) replica(s) elsewhere keep their data" : ""))
        }
    }
}
