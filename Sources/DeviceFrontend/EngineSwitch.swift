import DeviceMapper
import KernelNBD
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// Moving a device from one engine to another with no request left to a
/// kernel timeout: the host's device-mapper device is suspended (new I/O
/// held above /dev/nbdX, the I/O in flight answered by the old engine), the
/// old engine lets go and the new one takes over (the caller's business),
/// then every connection of /dev/nbdX is replaced by one to the new engine
/// and the held I/O goes on. In the 6.1 kernel a request sent on a
/// connection its engine no longer reads is answered only when its timer
/// fires: holding the I/O above the device is what leaves none there.
extension DeviceFrontend {
    public struct SwitchError: Error, CustomStringConvertible {
        public let description: String
    }

    /// Held once the suspend is done: until then the watcher still replaces a link that dies
    /// (the requests in flight on it must finish for the suspend to return).
    var isHeld: Bool { hold.withLock { $0?.established == true } }

    /// Holds the device's I/O for an engine switch, at most `seconds` (then it
    /// goes on with the engine it has). Returns how long the I/O in flight took
    /// to finish, and how many requests /dev/nbdX still has (none, normally).
    public func holdIO(seconds: Double) throws -> (took: Double, inFlight: Int) {
        guard let linear else {
            throw SwitchError(description: "the device was attached without its device-mapper device (keel frontend serve --mapper): its I/O cannot be held for a switch")
        }
        let started = monotonicSeconds()
        let reports: KernelNBD.DeadLinks
        do {
            relinking.lock()
            defer { relinking.unlock() }
            guard device.deadLinks() == 0 else {
                throw SwitchError(description: "the device is not connected to its engine on every link now; try again in a moment")
            }
            // Subscribed before anything dies: each link's report counts, also the old engine closing it.
            reports = try KernelNBD.DeadLinks()
            try hold.withLock { hold in
                guard hold == nil else { throw SwitchError(description: "the device's I/O is held already (a switch is under way)") }
                hold = (started, started + seconds, false)
            }
        }
        // Not under `relinking`: a link that dies meanwhile must be replaced for the suspend to return.
        do { try linear.suspend() } catch {
            hold.withLock { $0 = nil }
            throw error
        }
        do {
            relinking.lock()
            defer { relinking.unlock() }
            // A link that died while the I/O drained was replaced: its report is not one the switch waits for.
            while try !reports.next(waitingUpTo: 0).isEmpty {}
            guard device.deadLinks() == 0 else {
                throw SwitchError(description: "a link of the device died while its I/O drained; the I/O goes on, try again in a moment")
            }
            switchReports = reports
            hold.withLock { $0?.established = true }
        } catch {
            hold.withLock { $0 = nil }
            try? linear.resume()
            throw error
        }
        let took = monotonicSeconds() - started
        let inFlight = device.requestsInFlight
        logger.notice("\(linear.path): I/O held for an engine switch (in flight drained in \(Int(took * 1000)) ms, \(inFlight) left on \(device.path ?? "the device"))")
        return (took, inFlight)
    }

    /// Connects every slot of /dev/nbdX to `next` and lets the held I/O go on;
    /// returns how long it was held. On failure the device goes on with the
    /// engine it had (its links are replaced as after any engine loss).
    public func switchEngine(to next: EngineEndpoint) throws -> Double {
        guard let linear, let heldSince = hold.withLock({ $0?.established == true ? $0?.since : nil }) else {
            throw SwitchError(description: "the device's I/O is not held: hold it first (the switch must find nothing in flight)")
        }
        relinking.lock()
        defer { relinking.unlock() }
        let previous = engine
        var encrypted = false
        do {
            var links: [EngineLink] = []
            defer { links.forEach { $0.fd.close() } }
            for _ in 0..<device.settings.connections { links.append(try link(to: next)) }
            encrypted = links.allSatisfy(\.encrypted)
            // The kernel reports each connection it gives up on: wait for all before handing it new ones
            // (RECONFIGURE fills only slots it holds dead).
            device.retireLinks()
            if let switchReports { try waitForDeadLinks(switchReports, count: device.settings.connections) }
            endpoint.withLock { $0 = next }
            _ = try device.replaceDeadLinks(with: links)
            links = []
        } catch {
            endpoint.withLock { $0 = previous }
            release(linear)
            throw SwitchError(description: "cannot connect the device to engine \(next): \(error); it goes on with engine \(previous)")
        }
        let held = release(linear, since: heldSince)
        logger.notice("/dev/nbd\(device.index.map(String.init) ?? "?"): switched from engine \(previous) to \(next)\(encrypted ? " (TLS held by the kernel, kTLS)" : ""); I/O held \(Int(held * 1000)) ms")
        observer?(.connected(next))
        return held
    }

    /// Lets the held I/O go on with the engine the device has (a switch given up); returns how long it was held.
    public func resumeHeld() throws -> Double {
        guard let linear, let heldSince = hold.withLock({ $0?.established == true ? $0?.since : nil }) else { throw SwitchError(description: "the device's I/O is not held") }
        relinking.lock()
        defer { relinking.unlock() }
        return release(linear, since: heldSince)
    }

    /// The watcher's check: a hold nobody ended in time ends here.
    func releaseExpiredHold() -> Bool {
        guard let held = hold.withLock({ $0 }), held.established, monotonicSeconds() > held.until, let linear else { return false }
        relinking.lock()
        defer { relinking.unlock() }
        guard hold.withLock({ $0 }) != nil else { return false }
        logger.warning("\(linear.path): no engine switch came within the hold; the I/O goes on with engine \(engine)")
        release(linear)
        return true
    }

    @discardableResult
    private func release(_ linear: LinearDevice, since: Double = monotonicSeconds()) -> Double {
        do { try linear.resume() } catch { logger.error("cannot resume \(linear.path): \(error)") }
        switchReports = nil
        hold.withLock { $0 = nil }
        return monotonicSeconds() - since
    }

    private func waitForDeadLinks(_ reports: KernelNBD.DeadLinks, count: Int) throws {
        var seen = 0
        let deadline = monotonicSeconds() + 5
        while seen < count {
            guard monotonicSeconds() < deadline else {
                throw SwitchError(description: "the kernel reported \(seen) of \(count) connections closed within 5 s")
            }
            seen += try reports.next(waitingUpTo: 100).filter { $0 == device.index }.count
        }
    }
}
