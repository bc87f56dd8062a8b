import Foundation
@testable import KernelNBD
import Testing

/// The bytes Keel sends the kernel's `nbd` family, and how it reads answers.
/// Netlink is host byte order; these tests run on little-endian x86-64.
@Suite struct NetlinkMessageTests {
    @Test func attributesArePaddedToFourBytes() {
        var out: [UInt8] = []
        NetlinkAttribute.string(10, "keel:v").append(to: &out)
        // length 4 + 7 ("keel:v\0") = 11, padded to 12
        #expect(out == [11, 0, 10, 0, 0x6b, 0x65, 0x65, 0x6c, 0x3a, 0x76, 0, 0])
        out = []
        NetlinkAttribute.u64(2, 0x0102_0304_0506_0708).append(to: &out)
        #expect(out == [12, 0, 2, 0, 8, 7, 6, 5, 4, 3, 2, 1])
    }

    @Test func aConnectMessageHasTheHeadersAndNestedSockets() {
        var configuration = KernelNBD.Configuration(size: 1 << 30, serverFlags: 0x10d, backendIdentifier: "keel:vol")
        configuration.deadConnectionTimeout = 30
        let message = NetlinkMessage(family: 0x1c, flags: 5, sequence: 7, command: 1, version: 1,
                                     attributes: KernelNBD.connectAttributes(sockets: [5, 6], configuration))
        let bytes = message.bytes
        #expect(bytes.count % 4 == 0)
        let length: UInt32? = Array(bytes[0..<4]).loadHost()
        #expect(length == UInt32(bytes.count))
        #expect(Array(bytes[4..<8]) == [0x1c, 0, 5, 0])           // family, NLM_F_REQUEST|NLM_F_ACK
        #expect(Array(bytes[8..<12]) == [7, 0, 0, 0])             // sequence
        #expect(Array(bytes[16..<20]) == [1, 1, 0, 0])            // NBD_CMD_CONNECT, version 1
        let attributes = try! NetlinkAttribute.parse(bytes[20...])
        #expect(attributes.map(\.type) == [2, 3, 4, 5, 8, 10, 7])
        #expect(attributes.first(2)?.u64 == 1 << 30)
        #expect(attributes.first(3)?.u64 == 4096)
        #expect(attributes.first(5)?.u64 == 0x10d)
        #expect(attributes.first(8)?.u64 == 30)
        #expect(attributes.first(10)?.string == "keel:vol")
        let sockets = attributes.first(7)!.children
        #expect(sockets.map(\.type) == [1, 1])                    // NBD_SOCK_ITEM
        #expect(sockets.map { $0.children.first(1)?.u32 } == [5, 6])  // NBD_SOCK_FD
    }

    @Test func aStatusAnswerListsDevices() throws {
        let item = { (index: UInt32, connected: UInt8) in
            NetlinkAttribute.nested(1, [.u32(1, index), .u8(2, connected)])
        }
        let answer = NetlinkMessage(family: 0x1c, flags: 0, sequence: 3, command: 5, version: 1,
                                    attributes: [.nested(9, [item(0, 1), item(3, 0)])]).bytes
        let ack = Self.errorMessage(sequence: 3, errno: 0)
        let replies = try NetlinkReply.parse(answer + ack)
        #expect(replies.count == 2)
        guard case .message(_, 3, 5, let attributes) = replies[0] else { Issue.record("\(replies)"); return }
        #expect(KernelNBD.devices(in: attributes) == [.init(index: 0, connected: true), .init(index: 3, connected: false)])
        guard case .status(3, 0) = replies[1] else { Issue.record("\(replies[1])"); return }
    }

    @Test func kernelErrorsAndBrokenAnswers() throws {
        guard case .status(9, let error) = try NetlinkReply.parse(Self.errorMessage(sequence: 9, errno: ENOENT))[0] else {
            Issue.record("no status")
            return
        }
        #expect(error == -ENOENT)
        // An attribute that claims more bytes than there are.
        #expect(throws: NetlinkError.self) { try NetlinkAttribute.parse([40, 0, 1, 0, 1, 2, 3, 4][...]) }
        // A header that claims more bytes than the datagram has.
        #expect(throws: NetlinkError.self) { try NetlinkReply.parse([64] + [UInt8](repeating: 0, count: 19)) }
    }

    /// On a kernel without the driver, attaching says how to load it.
    @Test func aMissingModuleIsNamed() throws {
        guard !FileManager.default.fileExists(atPath: "/sys/module/nbd") else { return }
        do {
            _ = try KernelNBD()
            Issue.record("the nbd family resolved on a kernel without the module")
        } catch let error as KernelNBD.Failure {
            #expect("\(error)".contains("modprobe nbd"))
        }
    }

    static func errorMessage(sequence: UInt32, errno: Int32) -> [UInt8] {
        var out: [UInt8] = []
        out.appendHost(UInt32(36))
        out.appendHost(UInt16(2))    // NLMSG_ERROR
        out.appendHost(UInt16(0))
        out.appendHost(sequence)
        out.appendHost(UInt32(0))
        out.appendHost(Int32(-errno))
        out += [UInt8](repeating: 0, count: 16)  // the request's header, echoed
        return out
    }
}

@Suite struct UdevMessageTests {
    /// udevd's message: "libudev\0", magic, header size, then the properties' offset (host order).
    @Test func propertiesAreReadAtTheHeadersOffset() {
        var message = Array("libudev".utf8) + [0]
        message += [0xfe, 0xed, 0xca, 0xfe, 40, 0, 0, 0, 40, 0, 0, 0, 0, 0, 0, 0]
        message += [UInt8](repeating: 0, count: 40 - message.count)
        for property in ["ACTION=change", "DEVNAME=/dev/nbd3", "DEVLINKS=/dev/keel/db"] {
            message += Array(property.utf8) + [0]
        }
        let properties = UdevEvents.properties(message)
        #expect(properties["ACTION"] == "change" && properties["DEVNAME"] == "/dev/nbd3")
        #expect(UdevEvents.properties(Array("add@/devices/virtual/block/nbd3".utf8) + [0]).isEmpty,
                "the kernel's own events are not udev's")
    }
}
