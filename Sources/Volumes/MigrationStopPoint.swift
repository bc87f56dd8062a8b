import Foundation

/// Test-only stop points of `keel migrate`: `KEEL_MIGRATION_STOP=POINT` makes
/// the command stop itself (SIGSTOP) at POINT, after a line in the migration
/// log, so that a test can crash or cut off a part at that very moment and
/// let the command go on (SIGCONT). Off unless the variable is set. The
/// confirm points also come in a rollback that switches back to engine A.
public enum MigrationStopPoint: String, CaseIterable, Sendable {
    /// `start`: engine B was spawned, not yet standing by.
    case spawned = "start:spawned"
    /// `confirm`: the device's I/O is held; engine A still serves.
    case held = "confirm:held"
    /// `confirm`: engine A stopped; engine B not yet activated.
    case oldStopped = "confirm:a-stopped"
    /// `confirm`: engine B serves; the device still points at engine A's links.
    case activated = "confirm:activated"
    /// `confirm`: the device switched to engine B; the record still says migrating.
    case switched = "confirm:switched"
    /// `rollback`: asked, engine B not yet stopped.
    case rollingBack = "rollback:begun"

    static let chosen: MigrationStopPoint? = {
        guard let raw = ProcessInfo.processInfo.environment["KEEL_MIGRATION_STOP"] else { return nil }
        guard let point = MigrationStopPoint(rawValue: raw) else {
            // A mistyped stop point would let a test pass without its fault.
            fputs("keel: KEEL_MIGRATION_STOP: unknown stop point '\(raw)'; one of "
                  + allCases.map(\.rawValue).joined(separator: ", ") + "\n", stderr)
            exit(2)
        }
        return point
    }()
}

extension Node {
    /// Stops this process at `point` if a test named it.
    func stopIfAsked(at point: MigrationStopPoint, volume: String) {
        guard MigrationStopPoint.chosen == point else { return }
        logMigration("migration of \(volume): stop point \(point.rawValue): process \(getpid()) stops")
        raise(SIGSTOP)
        logMigration("migration of \(volume): stop point \(point.rawValue): going on")
    }
}
