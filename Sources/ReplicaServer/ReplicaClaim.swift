import Logging
import ReplicaIdentity
import ReplicaStore

/// An engine claiming the replica, by opening its export with a newer epoch
/// or through the control API's `Claim`: persisted first, then the fence moves
/// on, so no request of an older epoch runs after the claim is answered.
struct ReplicaClaim {
    let store: ReplicaStore
    let fence: EpochFence
    let logger: Logger

    enum Refusal: Error, CustomStringConvertible {
        /// The claim is not allowed (stale, taken, another volume).
        case policy(String)
        /// The replica could not persist it.
        case platform(String)

        var description: String {
            switch self {
            case .policy(let reason), .platform(let reason): reason
            }
        }
    }

    func claim(_ owner: Owner, volume: VolumeIdentity) throws(Refusal) {
        let current = store.epoch
        fence.beginClaim(owner.epoch)
        defer { fence.endClaim(owner.epoch) }
        do {
            switch try store.claim(owner, volume: volume) {
            case .claimed:
                fence.advance(to: owner.epoch)
                logger.notice("epoch \(owner.epoch) claimed by engine \(owner.engine) (was \(current))")
            case .current: break
            case .stale(let newer): throw Refusal.policy(Self.stale(owner.epoch, newer))
            case .taken(let other):
                throw Refusal.policy("epoch \(owner.epoch) already belongs to engine \(other); pick a newer epoch")
            case .otherVolume(let reason): throw Refusal.policy(reason)
            }
        } catch let refusal as Refusal {
            throw refusal
        } catch {
            logger.error("cannot persist epoch \(owner.epoch): \(error)")
            throw Refusal.platform("the replica cannot persist epoch \(owner.epoch): \(error)")
        }
    }

    static func stale(_ epoch: UInt64, _ current: UInt64) -> String {
        "epoch \(epoch) is older than this replica's epoch \(current): a newer engine owns it"
    }
}
