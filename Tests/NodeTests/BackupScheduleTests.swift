import Daemons
import Foundation
import Testing

/// A backup schedule's systemd units: what they say and that they parse back (systemd runs them in
/// Tests/KernelScenarios/volume-systemd.sh).
@Suite struct BackupScheduleTests {
    func schedule(_ timing: BackupSchedule.Timing, target: String = "file:///mnt/backups") -> BackupSchedule {
        BackupSchedule(volume: "db.main", name: "hourly", target: target, timing: timing, keep: 24,
                       stateDirectory: "/var/lib/keel", executable: "/usr/local/bin/keel")
    }

    @Test func intervalsParseAndPrint() {
        #expect(BackupSchedule.parseInterval("90s") == 90)
        #expect(BackupSchedule.parseInterval("15m") == 900)
        #expect(BackupSchedule.parseInterval("1h") == 3600)
        #expect(BackupSchedule.parseInterval("2d") == 172_800)
        for bad in ["", "h", "0h", "-1h", "1x", "1.5h", "99999d"] { #expect(BackupSchedule.parseInterval(bad) == nil, "\(bad)") }
        #expect(BackupSchedule.intervalText(7200) == "2h" && BackupSchedule.intervalText(90) == "90s")
    }

    @Test func anIntervalTimerIsAccurateToATenthAndParsesBack() throws {
        let every = schedule(.every(seconds: 20))
        #expect(every.unit == "keel-backup:db.main:hourly")
        #expect(every.timerUnit.contains("OnUnitActiveSec=20s\nAccuracySec=2s"))
        #expect(BackupSchedule.parse(timerUnit: every.timerUnit, executable: every.executable) == every)
        let daily = schedule(.calendar("*-*-* 02:30"))
        #expect(daily.timerUnit.contains("OnCalendar=*-*-* 02:30\nPersistent=true"))
        #expect(BackupSchedule.parse(timerUnit: daily.timerUnit, executable: daily.executable) == daily)
        #expect(BackupSchedule.parse(timerUnit: "[Timer]\nOnCalendar=daily\n", executable: "keel") == nil, "not ours")
    }

    @Test func theServiceRunsCreateAndLoadsCredentialsFromAFileNeverItself() {
        var s3 = schedule(.every(seconds: 3600), target: "s3://bucket/100%$db")
        s3.loadsCredentials = true
        s3.environment = ["AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": "https://s3.example"]
        let service = s3.serviceUnit(configurationDirectory: "/etc/keel")
        #expect(service.contains("""
            ExecStart="/usr/local/bin/keel" "backup" "create" "db.main" "--target" "s3://bucket/100%%$$db" "--schedule" "hourly" \
            "--keep" "24" "--state-dir" "/var/lib/keel"
            """))
        #expect(service.contains("LoadCredential=aws:/etc/keel/credentials/keel-backup:db.main:hourly\n"))
        #expect(service.contains("Environment=\"AWS_REGION=eu-west-1\""))
        #expect(!service.lowercased().contains("secret"))
    }

    @Test func cronLinesForWhereSystemdIsNotPID1() {
        #expect(schedule(.every(seconds: 3600)).cronLine.hasPrefix("0 */1 * * * root /usr/local/bin/keel backup create db.main"))
        #expect(schedule(.every(seconds: 900)).cronLine.hasPrefix("*/15 * * * * root "))
        #expect(schedule(.every(seconds: 86400)).cronLine.hasPrefix("0 0 */1 * * root "))
        #expect(schedule(.every(seconds: 90)).cronLine.hasPrefix("* * * * * root "), "cron's finest step is a minute")
        #expect(schedule(.calendar("daily")).cronLine.hasPrefix("MIN HOUR DAY MONTH WEEKDAY root "))
    }
}
