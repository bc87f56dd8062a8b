import ArgumentParser
import BackupStore
import ControlAPI
import Foundation
import Logging
import NodeRegistry
import ReplicaIdentity
import Syscalls
import Volumes

extension Backup {
    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Back up a volume: snapshot it, read only what changed since its last backup in the store, store the blocks the store lacks.",
            discussion: """
                The snapshot taken (backup-ID) stays until the volume's next backup in this store, which \
                reads only the blocks changed since it; if it was removed, the next backup reads the whole \
                volume and says so. Example: keel backup create db --target file:///mnt/backups
                """)

        @OptionGroup var snapshotTarget: Snapshot.Target

        @OptionGroup var store: Store

        @Option(help: "Back up this existing snapshot instead of taking one.")
        var snapshot: String?

        @Option(help: "Blocks read and stored at once.")
        var parallel = 8

        @Option(help: "Seconds the whole backup may take, a detached volume's engine start included; past them it stops, removes its snapshot and fails.")
        var timeout: Double = 6 * 3600

        @Option(help: ArgumentHelp("Mark the backup as made by this recurring schedule (keel backup schedule runs create so).", valueName: "name"))
        var schedule: String?

        @Option(help: ArgumentHelp("With --schedule: afterwards keep the schedule's newest N backups of the volume in the store, remove the older ones.", valueName: "N"))
        var keep: Int?

        func validate() throws {
            if let snapshot, !SnapshotName.isValid(snapshot) {
                throw ValidationError("'\(snapshot)' is not a snapshot name: use \(SnapshotName.rule)")
            }
            guard (1 ... 64).contains(parallel) else { throw ValidationError("--parallel must be between 1 and 64") }
            guard timeout > 0 else { throw ValidationError("--timeout must be a positive number of seconds") }
            if let schedule, !ScheduleName.isValid(schedule) {
                throw ValidationError("'\(schedule)' is not a schedule name: use \(ScheduleName.rule)")
            }
            if let keep, keep < 1 || schedule == nil { throw ValidationError("--keep takes a count of 1 or more, and needs --schedule") }
        }

        func run() throws {
            let volume = snapshotTarget.volume
            let json = snapshotTarget.json
            let deadline = Date().addingTimeInterval(timeout)
            let backupStore = try store.open(create: true)
            let (control, job) = try snapshotTarget.engineForJob(timeout: timeout)
            var notes: [String] = []
            if job?.startedForJob == true { notes.append("volume \(volume) is detached: its engine started for the backup, frontend disabled") }
            defer {
                if let released = job?.release() { notes.append(released) }
                if !json { for note in notes { FileHandle.standardError.write(Data("keel: \(note)\n".utf8)) } }
            }
            let outcome = try backUp(volume: volume, store: backupStore, control: control, deadline: deadline)
            if case .made(let summary, _) = outcome, let schedule, let keep {
                notes += try applyRetention(of: schedule, keep: keep, store: backupStore, newest: summary.id)
            }
            if let released = job?.release() { notes.append(released) }
            try report(outcome, notes: notes)
        }

        enum Outcome {
            case made(BackupSummary, fullReadReason: String?)
            case skipped(latest: BackupSummary)
        }

        private func backUp(volume: String, store backupStore: BackupStore, control: String, deadline: Date) throws -> Outcome {
            let replicas = try callEngine(control, doing: "report its replicas") { try await $0.status(.init()) }.replicas
                .map { try parseListenAddress($0.address, option: "--replica") }
            guard !replicas.isEmpty else { throw KeelError("volume \(volume) has no replica to back up from") }
            let logger = makeLogger(label: "keel.backup", level: .warning)
            let writerID = BackupID.make()
            let snapshotName = snapshot ?? "backup-" + writerID.dropFirst("bk-".count).lowercased()
            if snapshot == nil {
                _ = try snapshotTarget.snapshots(doing: "take snapshot \(snapshotName) for the backup", through: control) {
                    try await $0.createSnapshot(.with { $0.name = snapshotName })
                }
            }
            let removeSnapshotTaken = {
                guard snapshot == nil else { return }
                _ = try? snapshotTarget.snapshots(doing: "remove snapshot \(snapshotName)", through: control) {
                    try await $0.removeSnapshot(.with { $0.name = snapshotName })
                }
            }
            let display = ProgressDisplay(json: snapshotTarget.json)
            let outcome = Result { () throws -> Outcome in
                let latest = try storeCall { try backupStore.backups(of: volume) }.last
                return try PrivateSnapshotExport.serve(volume: volume, snapshot: snapshotName, changedSince: latest?.snapshot,
                                                       replicas: replicas, logger: logger) { export in
                    let source = try storeCall { try NBDBackupSource(uri: export.uri) }
                    let session = SnapshotExportName(volume: volume, snapshot: snapshotName).description
                    source.sessions = replicas.map { SnapshotSession(address: $0, exportName: session) }
                    var parent: BackupParent?
                    var fullReadReason: String?
                    if let latest {
                        if export.olderSnapshots.contains(latest.snapshot),
                           let changed = try storeCall({ try source.changedBlocks(since: latest.snapshot, blockSize: backupStore.config.blockSize) }) {
                            // Nothing written since the last backup: a new one would hold the same blocks.
                            if changed.isEmpty, snapshot == nil, latest.size == source.size { return .skipped(latest: latest) }
                            parent = BackupParent(summary: latest, map: try storeCall { try backupStore.map(latest.id) }, changed: changed)
                        } else {
                            fullReadReason = "snapshot \(latest.snapshot) of the last backup (\(latest.id)) is gone: reading the whole volume"
                        }
                    }
                    if let fullReadReason, !snapshotTarget.json { FileHandle.standardError.write(Data("keel: \(fullReadReason)\n".utf8)) }
                    try TestPausePoint.pause(at: "backup-read", until: deadline)
                    var writer = BackupWriter(store: backupStore, source: source, volume: volume, snapshot: snapshotName,
                                              snapshotTakenForBackup: snapshot == nil, parent: parent)
                    writer.parallel = parallel
                    writer.id = writerID
                    writer.schedule = schedule
                    writer.deadline = deadline
                    return .made(try storeCall { try writer.run(progress: display.show) }, fullReadReason: fullReadReason)
                }
            }
            display.finish()
            switch outcome {
            case .failure(let error):
                // Nothing half-made stays: the snapshot this run took goes too.
                removeSnapshotTaken()
                if Date() > deadline {
                    throw KeelError("backup of \(volume) did not finish within --timeout \(Int(timeout)) s: stopped, nothing listed (\(error))")
                }
                throw error
            case .success(.skipped(let latest)):
                removeSnapshotTaken()
                return .skipped(latest: latest)
            case .success(.made(let summary, let reason)):
                // The parent's snapshot served its turn: the next incremental starts from this one.
                if let parentID = summary.parent, let parent = try? backupStore.summary(parentID), parent.snapshotTakenForBackup,
                   parent.snapshot != summary.snapshot {
                    _ = try? snapshotTarget.snapshots(doing: "remove snapshot \(parent.snapshot)", through: control) {
                        try await $0.removeSnapshot(.with { $0.name = parent.snapshot })
                    }
                }
                return .made(summary, fullReadReason: reason)
            }
        }

        /// Removes the schedule's backups of the volume beyond the newest `keep`; says what it removed.
        private func applyRetention(of schedule: String, keep: Int, store backupStore: BackupStore, newest: String) throws -> [String] {
            // Oldest first (ids sort by time); the backup just made is among the newest kept.
            let ours = try storeCall { try backupStore.backups(of: snapshotTarget.volume) }.filter { $0.schedule == schedule && $0.id <= newest }
            return try ours.dropLast(keep).map { old in
                try storeCall { try backupStore.remove(old.id) }
                return "backup \(old.id) removed: schedule \(schedule) keeps \(keep)"
            }
        }

        private func report(_ outcome: Outcome, notes: [String]) throws {
            let volume = snapshotTarget.volume
            switch outcome {
            case .skipped(let latest):
                let reason = "nothing was written to \(volume) since backup \(latest.id): skipped"
                if snapshotTarget.json { return try printJSON(["skipped": true, "reason": reason, "latest": latest.id, "notes": notes]) }
                print(reason)
            case .made(let summary, let fullReadReason):
                if snapshotTarget.json {
                    var fields = summaryJSON(summary)
                    fields["full_read_reason"] = fullReadReason ?? NSNull()
                    fields["notes"] = notes
                    return try printJSON(fields)
                }
                print("backup \(summary.id) of \(volume) (snapshot \(summary.snapshot)) made: "
                    + (summary.incremental ? "incremental from \(summary.parent!)" : "full")
                    + "; read \(humanSize(summary.bytesRead)), sent \(humanSize(summary.bytesSent)), \(summary.newBlocks) new block(s) of \(summary.blocks)")
            }
        }
    }
}
