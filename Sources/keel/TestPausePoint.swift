import Foundation
import Volumes

/// A test-only stop point: when `KEEL_TEST_PAUSE_AT` names this point, the job creates the file
/// `KEEL_TEST_PAUSE_FILE` and waits while it exists (until the deadline), so that a test can act
/// at a known moment of the job (attach during a backup, say) and then let it go on.
enum TestPausePoint {
    static func pause(at point: String, until deadline: Date) throws {
        let environment = ProcessInfo.processInfo.environment
        guard environment["KEEL_TEST_PAUSE_AT"] == point, let file = environment["KEEL_TEST_PAUSE_FILE"] else { return }
        FileManager.default.createFile(atPath: file, contents: Data("\(getpid())\n".utf8))
        while FileManager.default.fileExists(atPath: file) {
            guard Date() < deadline else { throw KeelError("paused at test point \(point) past the deadline") }
            usleep(50_000)
        }
    }
}
