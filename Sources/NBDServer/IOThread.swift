import IOUring
import Logging
import NBDProtocol
import Synchronization
import Syscalls
import TLSSession
#if canImport(Glibc)
import Glibc
#endif

/// One I/O thread: a ring, its buffers, the connections it accepted, and the
/// device worker. Everything here runs on that one thread; other threads
/// reach it only through its eventfd (wake: stop).
final class IOThread<Device: BlockDevice> {
    struct Configuration {
        var ringEntries: UInt32 = 512
        var receiveBufferCount = 256
        var receiveBufferSize = 64 * 1024
        var arenaBytes = 64 << 20
        /// How long a stopping server waits for clients to take their replies.
        var shutdownGraceSeconds = 2
    }

    let id: Int
    let device: Device
    let catalog: any ExportCatalog
    let listener: FileDescriptor
    let tls: ServerTLS
    let configuration: Configuration
    var logger: Logger
    let wake: EventFD

    private var ring: Ring!
    private var arena: BufferArena!
    private var receiveBuffers: ProvidedBuffers!
    private var worker: Device.Worker!

    private var connections: [Connection?] = []
    private var freeConnectionIndexes: [Int] = []
    private var liveConnections = 0
    private var needsFlush: [Connection] = []
    private var starvedReceives: [Connection] = []
    private var stopping = false
    /// This kernel has no TLS upper layer (no tls.ko): sessions stay in user space.
    private var kernelTLSMissing = false
    private let wakeCounter = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    private lazy var graceTimeout = TimeoutDuration(nanoseconds: Int64(configuration.shutdownGraceSeconds) * 1_000_000_000)

    init(id: Int, device: Device, catalog: any ExportCatalog, listener: FileDescriptor, tls: ServerTLS,
         configuration: Configuration, logger: Logger) throws {
        self.id = id
        self.tls = tls
        self.device = device
        self.catalog = catalog
        self.listener = listener
        self.configuration = configuration
        self.logger = logger
        self.logger[metadataKey: "thread"] = "\(id)"
        wake = try EventFD()
    }

    deinit {
        wakeCounter.deallocate()
        wake.descriptor.close()
    }

    /// Creates the ring and everything registered with it. Must run on the
    /// thread that will run `run()`: the ring accepts submissions from its creator only.
    func setUp() throws {
        ring = try Ring(entries: configuration.ringEntries)
        arena = try BufferArena(ring: ring, bytes: configuration.arenaBytes)
        receiveBuffers = try ProvidedBuffers(ring: ring, groupID: 1, count: configuration.receiveBufferCount,
                                             bufferSize: configuration.receiveBufferSize)
        worker = try device.makeWorker(ring: ring, arena: arena)
        if !ring.acceptedPreferredFlags {
            logger.info("io_uring without SINGLE_ISSUER|DEFER_TASKRUN on this kernel; using a plain ring")
        }
    }

    func run() throws {
        ring.acceptMultishot(listener, userData: IOToken(.accept).rawValue)
        ring.readEvent(wake.descriptor, into: wakeCounter, userData: IOToken(.wake).rawValue)
        while !(stopping && liveConnections == 0) {
            try ring.submitAndWait(1)
            ring.drainCompletions { handle($0) }
            finishBatch()
        }
    }

    // MARK: - Completions

    private func handle(_ completion: Completion) {
        let token = IOToken(rawValue: completion.userData)
        switch token.kind {
        case .accept:
            onAccept(completion)
        case .receive:
            guard let connection = connections[token.connection] else { return }
            onReceive(connection, completion)
            settle(connection)
        case .send:
            guard let connection = connections[token.connection] else { return }
            onSend(connection, result: completion.result)
            settle(connection)
        case .device:
            guard let connection = connections[token.connection] else { return }
            let slot = connection.slots.advanced(by: token.slot)
            precondition(slot.pointee.state == .inFlight, "a device completion for a request that is not in flight")
            if case .done(let error) = worker.complete(slot.request, token: token, result: completion.result) {
                finish(connection, slot: token.slot, error: error)
            }
            settle(connection)
        case .worker:
            worker.workerEvent(token: token, result: completion.result, flags: completion.flags)
        case .wake:
            beginStopping()
        case .graceTimer:
            for case let connection? in connections { abort(connection); settle(connection) }
        case .cancel, nil:
            break
        }
    }

    private func finishBatch() {
        receiveBuffers.publish()
        if !starvedReceives.isEmpty {
            for connection in starvedReceives where !connection.closing && !connection.receiving {
                armReceive(connection)
            }
            starvedReceives.removeAll(keepingCapacity: true)
        }
        // Flushing may queue more (a closing TLS session's close_notify).
        while !needsFlush.isEmpty {
            let connections = needsFlush
            needsFlush.removeAll(keepingCapacity: true)
            for connection in connections { flush(connection) }
        }
    }

    // MARK: - Accept and close

    private func onAccept(_ completion: Completion) {
        if completion.result >= 0 {
            let fd = FileDescriptor(rawValue: completion.result)
            if stopping { fd.close() } else { open(fd) }
        } else if completion.result != -ECANCELED {
            logger.warning("accept failed: \(SystemError(errno: -completion.result, "accept"))")
        }
        if !completion.hasMore && !stopping {
            ring.acceptMultishot(listener, userData: IOToken(.accept).rawValue)
        }
    }

    /// A new connection, from the handshake's greeting on.
    private func open(_ fd: FileDescriptor) {
        let index: Int
        if let free = freeConnectionIndexes.popLast() { index = free } else {
            index = connections.count
            connections.append(nil)
        }
        let connection = Connection(index: index, fd: fd, phase: .handshake(Handshake(catalog: catalog, tls: tls.policy)))
        connections[index] = connection
        liveConnections += 1
        Socket.setNoDelay(fd)
        connection.rawOutput = Handshake.greeting
        markForFlush(connection)
        armReceive(connection)
        logger.debug("connection \(index) opened")
    }

    /// Closes the connection once nothing refers to it any more.
    private func settle(_ connection: Connection) {
        guard connection.closing, !connection.hasQueuedOutput || connection.aborted else { return }
        guard connection.busySlots == 0, !connection.sending else { return }
        if connection.receiving {
            if !connection.receiveCancelled {
                connection.receiveCancelled = true
                ring.cancel(userData: IOToken(.receive, connection: connection.index).rawValue,
                            userData: IOToken(.cancel).rawValue)
            }
            return
        }
        dropInput(connection)
        if case .transmission(let policy) = connection.phase {
            catalog.transmissionEnded(policy.negotiated.export)
        }
        connection.fd.close()
        connections[connection.index] = nil
        freeConnectionIndexes.append(connection.index)
        liveConnections -= 1
        logger.debug("connection \(connection.index) closed")
    }

    /// No more requests are read from this connection; work already accepted still finishes.
    private func stopReading(_ connection: Connection) {
        connection.closing = true
        switch connection.payloadTarget {
        case .slot(let slot), .discard(let slot):
            release(connection, slot: slot)
        case .none:
            break
        }
        connection.payloadTarget = .none
        dropInput(connection)
        if let tls = connection.tls {
            connection.plaintextHead = connection.plaintextCount
            tls.closeNotify()
            takeTLSOutput(connection, tls)
        }
    }

    /// Drops queued replies and shuts the socket so pending receives and sends end.
    private func abort(_ connection: Connection) {
        guard !connection.aborted else { return }
        stopReading(connection)
        connection.aborted = true
        Socket.shutdown(connection.fd)
        connection.rawOutput.removeAll()
        while let slot = connection.popQueuedReply() { release(connection, slot: slot) }
    }

    private func beginStopping() {
        guard !stopping else { return }
        stopping = true
        ring.cancel(userData: IOToken(.accept).rawValue, userData: IOToken(.cancel).rawValue)
        for case let connection? in connections {
            stopReading(connection)
            settle(connection)
        }
        ring.timeout(graceTimeout, userData: IOToken(.graceTimer).rawValue)
    }

    // MARK: - Receive

    private func armReceive(_ connection: Connection) {
        connection.receiving = true
        ring.receiveMultishot(connection.fd, group: receiveBuffers,
                              userData: IOToken(.receive, connection: connection.index).rawValue)
    }

    private func onReceive(_ connection: Connection, _ completion: Completion) {
        let result = completion.result
        if result > 0, let id = completion.bufferID {
            if connection.closing {
                receiveBuffers.recycle(id)
            } else {
                connection.input.append(.init(bufferID: id, offset: 0, length: Int(result)))
                processInput(connection)
            }
        } else if result == 0 {
            stopReading(connection)
        } else if result != -ENOBUFS && result != -ECANCELED {
            logger.debug("connection \(connection.index): receive failed: \(SystemError(errno: -result, "recv"))")
            abort(connection)
        }
        guard !completion.hasMore else { return }
        connection.receiving = false
        guard !connection.closing else { return }
        if connection.kernelTLSWanted {
            handOverToKernel(connection)
            return
        }
        if result == -ENOBUFS { starvedReceives.append(connection) } else { armReceive(connection) }
    }

    private func processInput(_ connection: Connection) {
        while connection.inputHead < connection.input.count && !connection.closing {
            if connection.tls != nil {
                passInputToTLS(connection)
                return
            }
            let entry = connection.input[connection.inputHead]
            let bytes = receiveBuffers.bytes(of: entry.bufferID, count: entry.length)
            var rest = UnsafeRawBufferPointer(rebasing: bytes[entry.offset...])
            consume(connection, &rest)
            if connection.closing { break }
            if !rest.isEmpty {
                // Every slot is busy: keep the rest until a reply frees one.
                connection.input[connection.inputHead].offset = entry.length - rest.count
                return
            }
            receiveBuffers.recycle(entry.bufferID)
            connection.inputHead += 1
        }
        if connection.inputHead == connection.input.count {
            connection.input.removeAll(keepingCapacity: true)
            connection.inputHead = 0
        }
    }

    /// The records received go into the session; what they decrypt to is consumed.
    private func passInputToTLS(_ connection: Connection) {
        let tls = connection.tls!
        while connection.inputHead < connection.input.count {
            let entry = connection.input[connection.inputHead]
            let bytes = receiveBuffers.bytes(of: entry.bufferID, count: entry.length)
            tls.feed(UnsafeRawBufferPointer(rebasing: bytes[entry.offset...]))
            receiveBuffers.recycle(entry.bufferID)
            connection.inputHead += 1
        }
        connection.input.removeAll(keepingCapacity: true)
        connection.inputHead = 0
        driveTLS(connection, tls)
    }

    /// Advances the TLS handshake, then decrypts and consumes records until
    /// the session needs more bytes or every slot is busy.
    private func driveTLS(_ connection: Connection, _ tls: TLSSession) {
        guard !connection.closing else { return }
        if !tls.isEstablished {
            let status = tls.handshake()
            takeTLSOutput(connection, tls)
            switch status {
            case .inProgress:
                return
            case .failed(let reason):
                logger.info("connection \(connection.index): TLS handshake failed: \(reason)")
                stopReading(connection)
                return
            case .established:
                logger.info("connection \(connection.index): \(tls.summary)")
                wantKernelTLS(connection)
            }
        }
        while !connection.closing {
            if connection.plaintextHead < connection.plaintextCount {
                var rest = UnsafeRawBufferPointer(rebasing: connection.plaintext[connection.plaintextHead..<connection.plaintextCount])
                consume(connection, &rest)
                connection.plaintextHead = connection.plaintextCount - rest.count
                if !rest.isEmpty { return }
                continue
            }
            switch tls.receive(into: connection.plaintext) {
            case .bytes(let count):
                connection.plaintextHead = 0
                connection.plaintextCount = count
            case .needMore:
                return
            case .closed:
                stopReading(connection)
            case .failed(let reason):
                logger.debug("connection \(connection.index): TLS record refused: \(reason)")
                abort(connection)
            }
        }
    }

    /// Asks for the session's records to go to the kernel (kTLS), where this
    /// kernel has it and the session allows: the receive is stopped so that
    /// no record is half read when the keys change hands.
    private func wantKernelTLS(_ connection: Connection) {
        guard !kernelTLSMissing, connection.receiving, !connection.closing else { return }
        connection.kernelTLSWanted = true
        ring.cancel(userData: IOToken(.receive, connection: connection.index).rawValue,
                    userData: IOToken(.cancel).rawValue)
    }

    /// Hands the records over once nothing is in flight either way; until
    /// then it waits (for the receive to end, the last records to leave),
    /// and if a record arrived in part it gives up and stays in user space.
    private func handOverToKernel(_ connection: Connection) {
        guard let session = connection.tls, !connection.closing, !connection.receiving else { return }
        guard !connection.sending, !connection.hasQueuedOutput, session.outgoing.isEmpty else { return }
        connection.kernelTLSWanted = false
        if connection.plaintextHead == connection.plaintextCount && session.kernelCanTakeOver {
            switch session.handOverToKernel(socket: connection.fd.rawValue) {
            case .done:
                connection.tls = nil
                connection.kernelTLS = true
                logger.info("connection \(connection.index): TLS records in the kernel (kTLS)")
            case .kernelLacksTLS:
                kernelTLSMissing = true
                logger.debug("connection \(connection.index): TLS stays in user space: this kernel has no kTLS")
            case .unavailable(let reason):
                logger.debug("connection \(connection.index): TLS stays in user space: \(reason)")
            case .broken(let reason):
                logger.warning("connection \(connection.index): kTLS half set up (\(reason)); closing")
                abort(connection)
                return
            }
        } else {
            logger.debug("connection \(connection.index): TLS stays in user space: a record arrived in part")
        }
        armReceive(connection)
        if connection.tls == nil, connection.hasPendingInput { processInput(connection) }
    }

    /// Records the session produced go out after everything queued before them.
    private func takeTLSOutput(_ connection: Connection, _ tls: TLSSession) {
        guard !tls.outgoing.isEmpty, !connection.aborted else { return }
        tls.takeOutgoing(into: &connection.rawOutput)
        markForFlush(connection)
    }

    /// Handshake replies: in plaintext, or through the session once it is up.
    private func appendReply(_ connection: Connection, _ reply: [UInt8]) {
        if let tls = connection.tls, tls.isEstablished {
            guard reply.withUnsafeBytes({ tls.send($0) }) else {
                abort(connection)
                return
            }
            takeTLSOutput(connection, tls)
        } else {
            connection.rawOutput.append(contentsOf: reply)
            markForFlush(connection)
        }
    }

    private func dropInput(_ connection: Connection) {
        while connection.inputHead < connection.input.count {
            receiveBuffers.recycle(connection.input[connection.inputHead].bufferID)
            connection.inputHead += 1
        }
        connection.input.removeAll(keepingCapacity: true)
        connection.inputHead = 0
    }

    private func consume(_ connection: Connection, _ rest: inout UnsafeRawBufferPointer) {
        if case .handshake(var handshake) = connection.phase {
            var reply: [UInt8] = []
            let step = handshake.receive(rest, reply: &reply)
            if !reply.isEmpty {
                appendReply(connection, reply)
                if connection.aborted { return }
                // A client that keeps asking and never reads would have the server
                // hold its answers without end: past the limit it is closed.
                guard connection.rawOutput.count <= Connection.unreadHandshakeLimit else {
                    logger.debug("connection \(connection.index): \(connection.rawOutput.count) bytes of handshake replies unread; closing")
                    abort(connection)
                    return
                }
            }
            switch step {
            case .needMore:
                connection.phase = .handshake(handshake)
                rest = UnsafeRawBufferPointer(rebasing: rest[rest.endIndex...])
                return
            case .close(let reason):
                logger.debug("connection \(connection.index): handshake ended: \(reason)")
                stopReading(connection)
                return
            case .startTLS(let consumed):
                precondition(connection.tls == nil, "STARTTLS inside a TLS session")
                connection.phase = .handshake(handshake)
                guard let credentials = tls.credentials, let session = try? TLSSession(credentials: credentials) else {
                    logger.error("connection \(connection.index): no TLS session could be made; closing")
                    abort(connection)
                    return
                }
                connection.startTLS(session)
                session.feed(UnsafeRawBufferPointer(rebasing: rest[(rest.startIndex + consumed)...]))
                rest = UnsafeRawBufferPointer(rebasing: rest[rest.endIndex...])
                return
            case .finished(let negotiated, let consumed):
                connection.phase = .transmission(RequestPolicy(negotiated))
                catalog.transmissionStarted(negotiated.export)
                rest = UnsafeRawBufferPointer(rebasing: rest[(rest.startIndex + consumed)...])
                logger.debug("connection \(connection.index): transmission, structured replies: \(negotiated.structuredReplies)")
            }
        }
        guard case .transmission(let policy) = connection.phase else { return }
        consumeRequests(connection, policy, &rest)
    }

    // MARK: - Requests

    private func consumeRequests(_ connection: Connection, _ policy: RequestPolicy,
                                 _ rest: inout UnsafeRawBufferPointer) {
        while true {
            if case .none = connection.payloadTarget, connection.freeSlots.isEmpty { return }
            guard let event = connection.parser.next(from: &rest) else { return }
            switch event {
            case .badMagic(let magic):
                logger.debug("connection \(connection.index): bad request magic 0x\(String(magic, radix: 16)); closing")
                abort(connection)
                return
            case .header(let header):
                accept(connection, policy, header)
                if connection.closing { return }
            case .payload(let piece, let isLast):
                switch connection.payloadTarget {
                case .slot(let slot):
                    let request = connection.slots[slot].request
                    request.buffer!.base.advanced(by: request.dataOffset + connection.payloadFilled)
                        .copyMemory(from: piece.baseAddress!, byteCount: piece.count)
                    connection.payloadFilled += piece.count
                    if isLast {
                        connection.payloadTarget = .none
                        start(connection, slot: slot)
                    }
                case .discard(let slot):
                    if isLast {
                        connection.payloadTarget = .none
                        finish(connection, slot: slot, error: connection.slots[slot].rejection)
                    }
                case .none:
                    preconditionFailure("payload without a WRITE header")
                }
            }
        }
    }

    private func accept(_ connection: Connection, _ policy: RequestPolicy, _ header: RequestHeader) {
        let verdict = policy.check(header)
        if verdict == .disconnect {
            stopReading(connection)
            return
        }
        let slot = connection.allocateSlot()!
        let s = connection.slots.advanced(by: slot)
        s.pointee.handle = header.handle
        s.pointee.request.command = header.command ?? .read
        s.pointee.request.flags = header.commandFlags
        s.pointee.request.offset = header.offset
        s.pointee.request.length = header.length
        s.pointee.request.session = policy.negotiated.export.session
        s.pointee.request.descriptorCount = 0
        s.pointee.request.wantsAllocation = policy.negotiated.baseAllocation
        s.pointee.request.extraContext = policy.negotiated.extraContext?.id ?? 0
        s.pointee.request.extraDescriptorCount = 0
        s.pointee.request.phase = 0
        s.pointee.request.pendingOperations = 0
        s.pointee.request.progress = 0
        s.pointee.request.firstError = nil

        var error: NBDError?
        if case .reject(let rejection) = verdict {
            error = rejection
        } else if header.length > 0 && !prepareBuffer(s) {
            error = .noMemory
        }
        if header.payloadLength > 0 {
            s.pointee.state = .receivingPayload
            s.pointee.rejection = error
            connection.payloadFilled = 0
            connection.payloadTarget = error == nil ? .slot(slot) : .discard(slot)
        } else if error != nil || header.length == 0 && s.pointee.request.command != .flush {
            // Zero-length requests succeed without touching the device.
            finish(connection, slot: slot, error: error)
        } else {
            start(connection, slot: slot)
        }
    }

    /// Lays the request's buffer out on the device's alignment boundaries.
    private func prepareBuffer(_ s: UnsafeMutablePointer<Slot>) -> Bool {
        let command = s.pointee.request.command
        let bytes: Int
        switch command {
        case .read, .write:
            let alignment = UInt64(device.alignment)
            let start = s.pointee.request.offset / alignment * alignment
            let end = (s.pointee.request.offset + UInt64(s.pointee.request.length) + alignment - 1) / alignment * alignment
            s.pointee.request.alignedOffset = start
            s.pointee.request.alignedLength = Int(end - start)
            s.pointee.request.dataOffset = Int(s.pointee.request.offset - start)
            bytes = Int(end - start)
        case .blockStatus:
            bytes = s.pointee.request.extraContext == 0 ? BufferArena.minimumChunk : BlockStatusLayout.bufferWithExtra
        default:
            return true
        }
        guard let buffer = arena.allocate(bytes) else { return false }
        s.pointee.request.buffer = buffer
        return true
    }

    private func start(_ connection: Connection, slot: Int) {
        connection.slots[slot].state = .inFlight
        let request = connection.slots.advanced(by: slot).request
        let status = worker.start(request, token: IOToken(.device, connection: connection.index, slot: slot))
        if case .done(let error) = status { finish(connection, slot: slot, error: error) }
    }

    /// The request is done: write its reply header and queue it.
    private func finish(_ connection: Connection, slot: Int, error: NBDError?) {
        guard !connection.aborted, case .transmission(let policy) = connection.phase else {
            release(connection, slot: slot)
            return
        }
        let s = connection.slots.advanced(by: slot)
        let header = s.replyHeaderBytes
        let handle = s.pointee.handle
        let request = s.pointee.request
        let structured = policy.negotiated.structuredReplies
        if error == nil && request.command == .read && request.length > 0 {
            s.pointee.replyHeaderLength = structured
                ? Reply.writeOffsetData(to: header, handle: handle, offset: request.offset, dataLength: request.length)
                : Reply.writeSimple(to: header, handle: handle, error: nil)
            s.pointee.replyData = UnsafeRawPointer(request.buffer!.base + request.dataOffset)
            s.pointee.replyDataLength = Int(request.length)
        } else if error == nil && request.command == .blockStatus {
            writeBlockStatusReply(s, policy.negotiated)
        } else {
            s.pointee.replyHeaderLength = Reply.writeStatus(to: header, handle: handle, error: error,
                                                            structured: structured, isRead: request.command == .read)
        }
        connection.queueReply(slot)
        markForFlush(connection)
    }

    /// One chunk per selected context: `base:allocation` first, with its
    /// descriptors where the device wrote them; the other context's chunk
    /// header goes right after them and its descriptors move up behind it,
    /// so the reply is one header and one run of bytes.
    private func writeBlockStatusReply(_ s: UnsafeMutablePointer<Slot>, _ negotiated: Negotiated) {
        let request = s.pointee.request
        let base = request.buffer!.base
        let header = s.replyHeaderBytes
        let handle = s.pointee.handle
        guard let extra = negotiated.extraContext else {
            s.pointee.replyHeaderLength = Reply.writeBlockStatusHeader(to: header, handle: handle,
                                                                       descriptors: request.descriptorCount)
            s.pointee.replyData = UnsafeRawPointer(base)
            s.pointee.replyDataLength = request.descriptorCount * 8
            return
        }
        let extraBytes = request.extraDescriptorCount * 8
        guard negotiated.baseAllocation else {
            s.pointee.replyHeaderLength = Reply.writeBlockStatusHeader(to: header, handle: handle, context: extra.id,
                                                                       descriptors: request.extraDescriptorCount)
            s.pointee.replyData = UnsafeRawPointer(request.extraDescriptors)
            s.pointee.replyDataLength = extraBytes
            return
        }
        s.pointee.replyHeaderLength = Reply.writeBlockStatusHeader(to: header, handle: handle,
                                                                   descriptors: request.descriptorCount, done: false)
        let second = base + request.descriptorCount * 8
        let secondHeader = Reply.writeBlockStatusHeader(to: second, handle: handle, context: extra.id,
                                                        descriptors: request.extraDescriptorCount)
        memmove(second + secondHeader, request.extraDescriptors, extraBytes)
        s.pointee.replyData = UnsafeRawPointer(base)
        s.pointee.replyDataLength = request.descriptorCount * 8 + secondHeader + extraBytes
    }

    private func release(_ connection: Connection, slot: Int) {
        let s = connection.slots.advanced(by: slot)
        if let buffer = s.pointee.request.buffer { arena.release(buffer) }
        if let scratch = s.pointee.request.scratch { arena.release(scratch) }
        s.pointee.request.buffer = nil
        s.pointee.request.scratch = nil
        connection.releaseSlot(slot)
        // A freed slot may unblock input that was waiting for one.
        if connection.hasPendingInput && !connection.closing {
            if let tls = connection.tls { driveTLS(connection, tls) } else { processInput(connection) }
        }
    }

    // MARK: - Send

    private func markForFlush(_ connection: Connection) {
        guard !connection.needsFlush else { return }
        connection.needsFlush = true
        needsFlush.append(connection)
    }

    /// Sends everything queued in one sendmsg; one send per connection is in flight at a time.
    private func flush(_ connection: Connection) {
        connection.needsFlush = false
        guard !connection.sending, !connection.aborted else { return }
        connection.batch.removeAll(keepingCapacity: true)
        connection.batchIovecEnds.removeAll(keepingCapacity: true)
        connection.iovecCount = 0
        if connection.rawOutput.isEmpty, let tls = connection.tls, tls.isEstablished {
            encryptQueuedReplies(connection, tls)
        }
        if !connection.rawOutput.isEmpty {
            let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: connection.rawOutput.count, alignment: 8)
            raw.copyBytes(from: connection.rawOutput)
            connection.rawOutput.removeAll()
            connection.rawInFlight = raw
            connection.iovecs[0] = iovec(iov_base: raw.baseAddress, iov_len: raw.count)
            connection.iovecCount = 1
            // Encrypted replies are done once all of it is sent (batchIovecEnds keeps its capacity).
            for _ in connection.batch { connection.batchIovecEnds.append(1) }
        } else {
            while connection.batch.count < Connection.maximumBatch, let slot = connection.popQueuedReply() {
                let s = connection.slots.advanced(by: slot)
                connection.iovecs[connection.iovecCount] = iovec(iov_base: s.replyHeaderBytes,
                                                                 iov_len: s.pointee.replyHeaderLength)
                connection.iovecCount += 1
                if s.pointee.replyDataLength > 0 {
                    connection.iovecs[connection.iovecCount] = iovec(
                        iov_base: UnsafeMutableRawPointer(mutating: s.pointee.replyData),
                        iov_len: s.pointee.replyDataLength)
                    connection.iovecCount += 1
                }
                connection.batch.append(Int32(slot))
                connection.batchIovecEnds.append(connection.iovecCount)
            }
            guard connection.iovecCount > 0 else { return }
        }
        submitSend(connection)
    }

    /// A batch of replies encrypted into `rawOutput` (headers and data share
    /// records); their slots stay the batch's until the records are sent.
    private func encryptQueuedReplies(_ connection: Connection, _ tls: TLSSession) {
        tls.cork()
        var sealed = true
        while sealed, connection.batch.count < Connection.maximumBatch, let slot = connection.popQueuedReply() {
            let s = connection.slots.advanced(by: slot)
            connection.batch.append(Int32(slot))
            sealed = tls.send(UnsafeRawBufferPointer(start: s.replyHeaderBytes, count: s.pointee.replyHeaderLength))
            if sealed && s.pointee.replyDataLength > 0 {
                sealed = tls.send(UnsafeRawBufferPointer(start: s.pointee.replyData, count: s.pointee.replyDataLength))
            }
        }
        if !tls.uncork() { sealed = false }
        guard sealed else {
            logger.debug("connection \(connection.index): TLS could not seal a reply; closing")
            for _ in connection.batch { connection.batchIovecEnds.append(0) }
            releaseBatch(connection, upTo: connection.batch.count)
            abort(connection)
            return
        }
        tls.takeOutgoing(into: &connection.rawOutput)
    }

    private func submitSend(_ connection: Connection) {
        connection.message.pointee.msg_iov = connection.iovecs
        connection.message.pointee.msg_iovlen = connection.iovecCount
        connection.sending = true
        ring.sendMessage(connection.fd, connection.message,
                         userData: IOToken(.send, connection: connection.index).rawValue)
    }

    private func onSend(_ connection: Connection, result: Int32) {
        connection.sending = false
        guard result >= 0, !connection.aborted else {
            releaseBatch(connection, upTo: connection.batch.count)
            abort(connection)
            return
        }
        var sent = Int(result)
        var finished = 0
        while finished < connection.iovecCount && sent >= connection.iovecs[finished].iov_len {
            sent -= connection.iovecs[finished].iov_len
            finished += 1
        }
        var slotsDone = 0
        while slotsDone < connection.batch.count && connection.batchIovecEnds[slotsDone] <= finished { slotsDone += 1 }
        releaseBatch(connection, upTo: slotsDone)
        if finished == connection.iovecCount {
            connection.iovecCount = 0
            if let raw = connection.rawInFlight { raw.deallocate(); connection.rawInFlight = nil }
            if connection.hasQueuedOutput { markForFlush(connection) }
            if connection.kernelTLSWanted { handOverToKernel(connection) }
            return
        }
        // A partial send: move what is left to the front and send it.
        connection.iovecs[finished].iov_base += sent
        connection.iovecs[finished].iov_len -= sent
        let left = connection.iovecCount - finished
        connection.iovecs.update(from: connection.iovecs + finished, count: left)
        connection.iovecCount = left
        for i in connection.batchIovecEnds.indices { connection.batchIovecEnds[i] -= finished }
        submitSend(connection)
    }

    private func releaseBatch(_ connection: Connection, upTo count: Int) {
        guard count > 0 else { return }
        for i in 0..<count { release(connection, slot: Int(connection.batch[i])) }
        connection.batch.removeFirst(count)
        connection.batchIovecEnds.removeFirst(count)
    }
}
