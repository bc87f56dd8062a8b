import Logging
import NBDProtocol
import ReplicaStore

/// A replica exports its head only to engines that name their epoch:
/// `<volume>@<epoch>`. Opening with a newer epoch claims the replica
/// (durably, before the answer); an older epoch is refused.
struct ReplicaCatalog: ExportCatalog {
    let store: ReplicaStore
    let logger: Logger

    /// `@<epoch>`: how an engine learns the epoch it has to outbid.
    var listed: [ExportDescription] {
        [ExportDescription(name: "@\(store.epoch)", description: "Keel replica", size: store.size, readOnly: false)]
    }

    static func epoch(in name: String) -> UInt64? {
        guard let at = name.lastIndex(of: "@") else { return nil }
        return UInt64(name[name.index(after: at)...])
    }

    func resolve(_ name: String, opening: Bool) -> ExportResolution {
        guard let epoch = Self.epoch(in: name) else {
            return .refused(.errPolicy, "a Keel replica serves only '<volume>@<epoch>' exports to its engine, not '\(name)'")
        }
        let current = store.epoch
        if opening {
            do {
                switch try store.claim(epoch: epoch) {
                case .claimed: logger.notice("epoch \(epoch) claimed (was \(current))")
                case .current: break
                case .stale(let newer): return refusal(epoch, newer)
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

    private func refusal(_ epoch: UInt64, _ current: UInt64) -> ExportResolution {
        .refused(.errPolicy, "epoch \(epoch) is older than this replica's epoch \(current): a newer engine owns it")
    }
}
