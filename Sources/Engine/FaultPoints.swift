#if canImport(Glibc)
import Glibc
#endif

/// Test-only fault points: races that otherwise need luck, made to happen on
/// cue. Off unless the `KEEL_FAULTS` environment variable names them
/// (comma-separated); the hot path pays one Bool test when off.
///
/// - `break-link-in-submit=R@N`: on each I/O thread, the link to replica R is
///   shut down just before the Nth command submitted to it, so that libnbd
///   finds the connection dead *inside* the submit call and completes the
///   queued commands there.
/// - `slow-membership=S`: the keeper waits S seconds before it records a new
///   membership generation on the replicas.
/// - `slow-rebuild=S`: a rebuild pauses S seconds after each region, so a test
///   can break things while it runs.
/// - `break-rebuild-source=N`: a rebuild's connection to its source is shut
///   down just before region N is copied, as if the source had died mid-copy.
/// - `die-mid-snapshot`: a snapshot is taken on the first writable replica
///   only, then the engine kills itself (SIGKILL), writes still held.
/// - `die-mid-removal`: a snapshot is removed from the first writable replica
///   only, then the engine kills itself (SIGKILL).
/// - `die-mid-revert`: the first writable replica reverts, then the engine
///   kills itself (SIGKILL).
/// - `die-mid-activation`: a standby engine claims its first replica only,
///   then kills itself (SIGKILL): the engine before it is fenced there alone.
/// - `drop-standby-links=S`: a standby engine shuts its sessions to every
///   replica down S seconds after it began standing by, as if cut off.
/// - `drop-standby-links-when=PATH`: the same, once the file PATH exists (on a
///   test's cue).
public struct FaultPoints: Sendable {
    public var breakLinkInSubmit: (replica: Int, command: Int)?
    public var slowMembershipSeconds: Double = 0
    public var slowRebuildSeconds: Double = 0
    public var breakRebuildSourceAtRegion: Int?
    public var dieMidSnapshot = false
    public var dieMidRemoval = false
    public var dieMidRevert = false
    public var dieMidActivation = false
    public var dropStandbyLinksAfter: Double?
    public var dropStandbyLinksWhen: String?

    /// Whether the I/O path has anything to inject.
    public var enabled: Bool { breakLinkInSubmit != nil }

    public static let none = FaultPoints()

    /// The fault points named by `KEEL_FAULTS`, or none.
    public static let fromEnvironment: FaultPoints = {
        guard let raw = getenv("KEEL_FAULTS") else { return .none }
        do { return try parse(String(cString: raw)) } catch {
            // A mistyped fault point would let a test pass without its fault.
            fputs("keel: KEEL_FAULTS: \(error)\n", stderr)
            exit(2)
        }
    }()

    public struct Malformed: Error, CustomStringConvertible {
        public let description: String
    }

    public static func parse(_ text: String) throws -> FaultPoints {
        var faults = FaultPoints()
        for item in text.split(separator: ",") {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            switch (parts.first, parts.count == 2 ? parts[1] : nil) {
            case ("break-link-in-submit", let value?):
                let numbers = value.split(separator: "@").compactMap { Int($0) }
                guard numbers.count == 2, numbers[0] >= 0, numbers[1] > 0 else {
                    throw Malformed(description: "break-link-in-submit takes REPLICA@N, not \(value)")
                }
                faults.breakLinkInSubmit = (numbers[0], numbers[1])
            case ("slow-membership", let value?):
                faults.slowMembershipSeconds = try seconds(value, for: "slow-membership")
            case ("break-rebuild-source", let value?):
                guard let region = Int(value), region >= 0 else {
                    throw Malformed(description: "break-rebuild-source takes a region number, not \(value)")
                }
                faults.breakRebuildSourceAtRegion = region
            case ("die-mid-snapshot", nil):
                faults.dieMidSnapshot = true
            case ("die-mid-removal", nil):
                faults.dieMidRemoval = true
            case ("die-mid-revert", nil):
                faults.dieMidRevert = true
            case ("die-mid-activation", nil):
                faults.dieMidActivation = true
            case ("drop-standby-links", let value?):
                faults.dropStandbyLinksAfter = try seconds(value, for: "drop-standby-links")
            case ("drop-standby-links-when", let value?):
                guard value.hasPrefix("/") else {
                    throw Malformed(description: "drop-standby-links-when takes an absolute file path, not \(value)")
                }
                faults.dropStandbyLinksWhen = value
            case ("slow-rebuild", let value?):
                faults.slowRebuildSeconds = try seconds(value, for: "slow-rebuild")
            default:
                throw Malformed(description: "unknown fault point '\(item)'")
            }
        }
        return faults
    }

    private static func seconds(_ value: String, for name: String) throws -> Double {
        guard let seconds = Double(value), seconds >= 0, seconds <= 60 else {
            throw Malformed(description: "\(name) takes seconds (0 to 60), not \(value)")
        }
        return seconds
    }
}
