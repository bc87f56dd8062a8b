import DeviceFrontend
import Foundation
import Syscalls

/// What a volume's device frontend last said of its engine, kept in
/// `run/VOL.frontend.json`: written by `keel frontend serve --status-file`,
/// read by `keel volume show` and `ls`.
public struct FrontendStatusFile: Codable {
    public enum State: String, Codable {
        case connected
        /// The engine does not answer; the kernel holds the device's I/O.
        case waiting
        /// Past the dead-connection timeout: the kernel fails the device's I/O.
        case failing
    }

    public var state: State
    public var engine: String
    public var failure: String?
    /// Seconds since the epoch.
    public var since: Int64

    public init(_ status: DeviceFrontend.Status, at since: Int64 = Int64(Date().timeIntervalSince1970)) {
        switch status {
        case .connected(let engine): (state, self.engine, failure) = (.connected, "\(engine.address)", nil)
        case .waiting(let engine, let failure): (state, self.engine, self.failure) = (.waiting, "\(engine.address)", failure)
        case .failing(let engine, let failure): (state, self.engine, self.failure) = (.failing, "\(engine.address)", failure)
        }
        self.since = since
    }

    public static func read(_ path: String) -> FrontendStatusFile? {
        guard let text = readSmallFile(path, limit: 64 * 1024) else { return nil }
        return try? JSONDecoder().decode(Self.self, from: Data(text.utf8))
    }

    public func write(_ path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        try writeFileAtomically(path, String(decoding: try encoder.encode(self), as: UTF8.self) + "\n")
    }

    public var json: [String: Any] { ["state": state.rawValue, "engine": engine, "failure": failure ?? NSNull(), "since": since] }
}
