import IOUring
import NBDProtocol

/// A request slot: one in-flight request of a connection, from its header
/// to the last byte of its reply. Slots live in one block per connection,
/// so their addresses (reply headers referenced by iovecs) never move.
struct Slot {
    enum State: UInt8 {
        case free
        case receivingPayload
        case inFlight
        case replyQueued
    }

    var state = State.free
    var handle: UInt64 = 0
    /// Set when the request is answered with this error without running it.
    var rejection: NBDError?
    var request = IORequest()
    var replyHeader = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
    var replyHeaderLength = 0
    var replyData: UnsafeRawPointer?
    var replyDataLength = 0
}

extension UnsafeMutablePointer where Pointee == Slot {
    /// The reply header's storage inside the slot.
    var request: UnsafeMutablePointer<IORequest> {
        (UnsafeMutableRawPointer(self) + MemoryLayout<Slot>.offset(of: \Slot.request)!)
            .assumingMemoryBound(to: IORequest.self)
    }

    var replyHeaderBytes: UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(self).advanced(by: MemoryLayout<Slot>.offset(of: \Slot.replyHeader)!)
    }
}
