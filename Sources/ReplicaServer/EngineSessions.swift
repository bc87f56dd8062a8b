import NBDProtocol
import Synchronization

/// Open engine connections by epoch: how a replica tells whether the engine
/// that owns it is alive and connected (`keel volume attach` refuses to take a
/// volume from a live engine).
public final class EngineSessions: Sendable {
    private let open = Mutex<[UInt64: Int]>([:])

    public init() {}

    public func connections(epoch: UInt64) -> Int { open.withLock { $0[epoch, default: 0] } }

    func started(_ export: ExportDescription) { open.withLock { $0[export.session, default: 0] += 1 } }

    func ended(_ export: ExportDescription) {
        open.withLock { sessions in
            let left = sessions[export.session, default: 1] - 1
            sessions[export.session] = left > 0 ? left : nil
        }
    }
}
