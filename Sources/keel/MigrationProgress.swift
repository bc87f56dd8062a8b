import Foundation
import NodeRegistry
import Syscalls

/// How a migration's progress is shown: a bar on a terminal, JSON lines with `--json`, a line per 10% otherwise.
struct MigrationProgress {
    let json: Bool
    let terminal = isatty(STDOUT_FILENO) == 1
    private var lastTenth = -1
    private var lastPhase = ""
    private var drewBar = false

    init(json: Bool) { self.json = json }

    mutating func show(_ record: MigrationRecord) {
        if json {
            guard record.phase != lastPhase || record.percent / 10 != lastTenth else { return }
            lastPhase = record.phase
            lastTenth = record.percent / 10
            print(Self.line(record))
        } else if terminal {
            let width = 40, filled = record.percent * width / 100
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            print("\r\(record.volume): [\(bar)] \(record.percent)% \(record.phase)\u{1B}[K", terminator: "")
            fflush(stdout)
            drewBar = true
        } else if record.percent / 10 > lastTenth || record.phase != lastPhase {
            lastTenth = record.percent / 10
            lastPhase = record.phase
            print("\(record.volume): \(record.percent)% (\(record.bytesDone) of \(record.bytesTotal) bytes), \(record.phase)")
        }
    }

    func finish() {
        if drewBar { print("") }
    }

    static func object(_ record: MigrationRecord, interrupted: Bool = false) -> [String: Any] {
        ["volume": record.volume, "kind": record.kind, "migration_status": record.status.rawValue, "phase": record.phase,
         "target": record.target, "bytes_done": record.bytesDone, "bytes_total": record.bytesTotal,
         "percent": record.percent, "error": record.error, "started_at": record.startedAt, "updated_at": record.updatedAt,
         "interrupted": interrupted]
    }

    static func line(_ record: MigrationRecord, interrupted: Bool = false) -> String {
        let data = (try? JSONSerialization.data(withJSONObject: object(record, interrupted: interrupted), options: [.sortedKeys])) ?? Data()
        return String(decoding: data, as: UTF8.self)
    }
}
