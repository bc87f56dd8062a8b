import Daemons
import Testing

@Suite struct DaemonTests {
    let engine = Daemon(kind: .engine, instance: "db", arguments: ["--size", "4096", "--replica", "10.0.0.2:7001"])
    let replica = Daemon(kind: .replica, instance: "db-r0", arguments: ["--dir", "/var/lib/keel/replicas/db/r0"])
    let frontend = Daemon(kind: .frontend, instance: "db", arguments: ["--engine", "unix:/var/lib/keel/run/db.nbd"])

    @Test func unitsAndCommandLinesMatchTheTemplates() {
        #expect(engine.unit == "keel-engine@db.service")
        #expect(engine.commandLine == ["engine", "serve", "--volume", "db", "--size", "4096", "--replica", "10.0.0.2:7001"])
        #expect(replica.unit == "keel-replica@db-r0.service")
        #expect(replica.commandLine == ["replica", "serve", "--dir", "/var/lib/keel/replicas/db/r0"])
        #expect(frontend.unit == "keel-frontend@db.service")
        #expect(frontend.commandLine == ["frontend", "serve", "--volume", "db", "--engine", "unix:/var/lib/keel/run/db.nbd"])
    }

    @Test func aDaemonIsKnownByItsVolumeOrDirectoryWhateverElseItWasGiven() {
        #expect(engine.identity == ["engine", "serve", "--volume", "db"])
        #expect(Daemon(kind: .engine, instance: "db", arguments: ["--device", "/dev/nbd3"]).identity == engine.identity)
        #expect(replica.identity == ["replica", "serve", "--dir", "/var/lib/keel/replicas/db/r0"])
        #expect(engine.description == "engine of volume db" && replica.description == "replica db-r0")
        #expect(frontend.identity == ["frontend", "serve", "--volume", "db"] && frontend.description == "device frontend of volume db")
    }

    @Test func environmentFilesCarryTheArguments() throws {
        let systemd = SystemdRunner(stateDirectory: "/var/lib/keel", configurationDirectory: "/etc/keel")
        #expect(systemd.environmentFile(engine) == "/etc/keel/volume-db.env")
        #expect(systemd.environmentFile(replica) == "/etc/keel/replica-db-r0.env")
        #expect(try systemd.environment(engine).hasSuffix("\nKEEL_ENGINE_ARGS=--size 4096 --replica 10.0.0.2:7001\n"))
        #expect(try systemd.environment(replica).hasSuffix("\nKEEL_REPLICA_ARGS=--dir /var/lib/keel/replicas/db/r0\n"))
        #expect(systemd.environmentFile(frontend) == "/etc/keel/frontend-db.env")
        #expect(try systemd.environment(frontend).hasSuffix("\nKEEL_FRONTEND_ARGS=--engine unix:/var/lib/keel/run/db.nbd\n"))
        let spaced = Daemon(kind: .replica, instance: "x", arguments: ["--dir", "/srv/my data"])
        #expect(throws: DaemonError.self) { try systemd.environment(spaced) }
    }

    /// A live migration under systemd starts engine B as the volume's other engine unit, with its own
    /// environment file (keel-engine-alt@.service reads volume-alt-NAME.env); the command line is the same.
    @Test func theAlternateEngineUnitHasItsOwnNameAndEnvironmentFile() {
        let alternate = Daemon(kind: .engine, instance: "db", arguments: engine.arguments, alternate: true)
        #expect(alternate.unit == "keel-engine-alt@db.service")
        #expect(alternate.identity == engine.identity && alternate.commandLine == engine.commandLine)
        let systemd = SystemdRunner(stateDirectory: "/var/lib/keel", configurationDirectory: "/etc/keel")
        #expect(systemd.environmentFile(alternate) == "/etc/keel/volume-alt-db.env")
    }
}
