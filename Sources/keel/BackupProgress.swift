import BackupStore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A backup's or restore's progress: a bar on a terminal, JSON lines with --json, nothing otherwise.
final class ProgressDisplay {
    let json: Bool
    let onTerminal = isatty(STDERR_FILENO) == 1
    let started = Date()
    private var lastJSON = Date.distantPast

    init(json: Bool) { self.json = json }

    func show(_ progress: TransferProgress) {
        let elapsed = max(Date().timeIntervalSince(started), 0.001)
        let rate = Double(progress.bytesDone) / elapsed
        if json {
            guard Date().timeIntervalSince(lastJSON) >= 1 else { return }
            lastJSON = Date()
            let line: [String: Any] = ["progress": ["bytes_done": progress.bytesDone, "bytes_total": progress.bytesTotal,
                                                    "bytes_read": progress.bytesRead, "bytes_sent": progress.bytesSent,
                                                    "bytes_per_second": Int(rate)]]
            if let data = try? JSONSerialization.data(withJSONObject: line, options: [.sortedKeys]) {
                print(String(decoding: data, as: UTF8.self))
                fflush(stdout)
            }
        } else if onTerminal {
            let share = progress.bytesTotal == 0 ? 1 : Double(progress.bytesDone) / Double(progress.bytesTotal)
            let filled = Int(share * 30)
            let eta = rate > 0 ? Int(Double(progress.bytesTotal - min(progress.bytesDone, progress.bytesTotal)) / rate) : 0
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: 30 - filled)
            fputs("\r[\(bar)] \(humanSize(progress.bytesDone)) / \(humanSize(progress.bytesTotal))  "
                + "\(humanSize(UInt64(rate)))/s  ETA \(eta)s   ", stderr)
        }
    }

    func finish() {
        if onTerminal && !json { fputs("\n", stderr) }
    }
}
