import ArgumentParser
import Daemons
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
            let schedules = removeSchedules(of: target.name, stateDirectory: node.layout.stateDirectory)
            if target.json {
                return try printJSON(["volume": target.name, "removed": true, "remote_replicas_kept": kept,
                                      "backup_schedules_removed": schedules] as [String: Any])
            }
            print("volume \(target.name) removed" + (kept > 0 ? "; \(kept) replica(s) elsewhere keep their data" : "")
                + (schedules.isEmpty ? "" : "; backup schedule(s) \(schedules.joined(separator: ", ")) removed (their backups stay)"))
        }

        /// A schedule of a volume that is gone would fail at every run: its timer goes with the volume.
        private func removeSchedules(of volume: String, stateDirectory: String) -> [String] {
            let installer = BackupScheduleInstaller()
            return installer.list(executable: currentExecutable())
                .filter { $0.volume == volume && $0.stateDirectory == stateDirectory }
                .compactMap { schedule in (try? installer.remove(volume: volume, name: schedule.name)) == true ? schedule.name : nil }
        }
    }
}
