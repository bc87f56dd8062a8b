import Logging
import NBDProtocol
import ReplicaStore

/// A replica exports its head only to engines that name their epoch and
/// themselves: `<volume>@<epoch>+<engine>`. Opening with a newer epoch claims
/// the replica (durably, before the answer); an older epoch is refused, and so
/// is the current one from another engine.
struct ReplicaCatalog: ExportCatalog {
    let store: ReplicaStore
    let sessions: EngineSessions
    let logger: Logger

    /// `@<epoch>`: how an engine learns the epoch it has to outbid.
    var listed: [ExportDescription] {
        [ExportDescription(name: "@\(store.epoch)", description: "Keel replica", size: store.size, readOnly: false)]
    }

    /// The epoch and engine in `<volume>@<epoch>[+<engine>]`.
    static func owner(in name: String) -> (epoch: UInt64, engine: String)? {
        guard let at = name.lastIndex(of: "@") else { return nil }
        let parts = name[name.index(after: at)...].split(separator: "+", maxSplits: 1, omittingEmptySubsequences: false)
        guard let epoch = UInt64(parts[0]) else { return nil }
        return (epoch, parts.count > 1 ? String(parts[1]) : "")
    }

    func resolve(_ name: String, opening: Bool) -> ExportResolution {
        guard let (epoch, engine) = Self.owner(in: name) else {
            return .refused(.errPolicy, "a Keel replica serves only '<volume>@<epoch>+<engine>' exports to its engine, not '\(name)'")
        }
        let current = store.epoch
        if opening {
            do {
                switch try store.claim(epoch: epoch, engine: engine) {
                case .claimed: logger.notice("epoch \(epoch) claimed by engine \(engine) (was \(current))")
                case .current: break
                case .stale(let newer): return refusal(epoch, newer)
                case .taken(let other):
                    return .refused(.errPolicy, "epoch \(epoch) already belongs to engine \(other); pick a newer epoch")
                }
            } catch {
                logger.error("cannot persist epoch \(epoch): \(error)")
                return .refused(.errPlatform, "the replica cannot persist epoch \(epoch): \(error)")
            }
        } else if epoch < current {
            return refusal(epoch, current)
        }
        return .found(ExportDescription(name: name, size: store.size, readOnly: false, session: epoch))
    }

    func transmissionStarted(_ export: ExportDescription) { sessions.started(export) }
    func transmissionEnded(_ export: ExportDescription) { sessions.ended(export) }

    private func refusal(_ epoch: UInt64, _ current: UInt64) -> ExportResolution {
        .refused(.errPolicy, "epoch \(epoch) is older than this replica's epoch \(current): a newer engine owns it")
    }
}
