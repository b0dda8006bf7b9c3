package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/testenv"
)

// cs is args after the CloudStack flags, which volumed requires.
func cs(args ...string) []string {
	return append([]string{"--cloudstack-url", "http://127.0.0.1:8080/client/api", "--cloudstack-api-key", "key",
		"--cloudstack-secret-key", "secret"}, args...)
}

// TestRunExitCodes checks that configuration errors exit 2 with a message
// naming the flag, and --help exits 0 listing every flag.
func TestRunExitCodes(t *testing.T) {
	shortTokenDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(shortTokenDir, "api-token"), []byte("short\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"help", []string{"--help"}, 0, "-correlation-timeout"},
		{"agent help", []string{"agent", "--help"}, 0, "-nats-url"},
		{"no cloudstack", nil, 2, "--cloudstack-api-key, --cloudstack-secret-key, --cloudstack-url required"},
		{"no cloudstack secret", []string{"--cloudstack-url", "http://127.0.0.1:8080/client/api", "--cloudstack-api-key", "k"}, 2,
			"--cloudstack-secret-key required"},
		{"bad duration", cs("--step-timeout", "soon"), 2, "--step-timeout"},
		{"step timeout too short", cs("--step-timeout", "10ms"), 2, "at least 1s"},
		{"stop grace too short", cs("--stop-grace", "0"), 2, "--stop-grace"},
		{"bad boolean", cs("--device-agent=maybe"), 2, "device-agent"},
		{"replicas out of range", cs("--nats-replicas", "7"), 2, "--nats-replicas"},
		{"empty URL in the NATS list", cs("--nats-url", "nats://127.0.0.1:4222,,nats://127.0.0.1:4223"), 2, "--nats-url: empty URL"},
		{"bad log level", cs("--log-level", "loud"), 2, "--log-level"},
		{"bad retention", cs("--op-retention", "-1h"), 2, "--op-retention"},
		{"pprof off loopback", cs("--pprof-listen", "0.0.0.0:6060"), 2, "--pprof-listen: want a loopback address"},
		{"stray argument", cs("extra"), 2, `unexpected argument "extra"`},
		{"agent without vm", []string{"agent", "--nats-url", "nats://127.0.0.1:4222"}, 2, "--vm-id is required"},
		{"agent without nats", []string{"agent", "--vm-id", "87654321-4321-4321-4321-210987654321"}, 2, "--nats-url is required"},
		{"nats creds without url", cs("--nats-creds", "x.creds"), 2, "--nats-creds needs --nats-url"},
		{"nats service creds without url", cs("--nats-service-creds", "x.creds"), 2, "--nats-service-creds needs --nats-url"},
		{"short api token", cs("--api-token", "short"), 2, "at least 16 characters"},
		{"short token in the data dir", cs("--data-dir", shortTokenDir), 2, "at least 16 characters"},
		{"missing token file", cs("--api-token-file", "/nonexistent/token"), 2, "--api-token-file"},
		{"creds without what", []string{"creds"}, 2, "needs agent or server-config"},
		{"creds agent without vm", []string{"creds", "agent"}, 2, "vm_id is required"},
		{"creds agent with a bad vm", []string{"creds", "agent", "--vm-id", "a.b"}, 2, "must be a UUID"},
		{"creds help", []string{"creds", "--help"}, 0, "volumed creds agent --vm-id"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			if code := run(tc.args, &out); code != tc.code || !strings.Contains(out.String(), tc.want) {
				t.Fatalf("exit %d, want %d; output lacks %q:\n%s", code, tc.code, tc.want, out.String())
			}
		})
	}
}

func TestConfigFromEnvironment(t *testing.T) {
	t.Setenv("CLOUDSTACK_API_URL", "http://cloudstack.example:8080/client/api")
	t.Setenv("CLOUDSTACK_API_KEY", "env-key")
	t.Setenv("CLOUDSTACK_SECRET_KEY", "env-secret")
	t.Setenv("VOLUMED_STEP_TIMEOUT", "90s")
	t.Setenv("VOLUMED_SYNC_INTERVAL", "0")
	t.Setenv("VOLUMED_LISTEN", "127.0.0.1:9999")
	t.Setenv("VOLUMED_OP_RETENTION", "0")
	t.Setenv("VOLUMED_STOP_GRACE", "2m")
	t.Setenv("VOLUMED_API_TOKEN", "from-the-environment-0123")
	t.Setenv("VOLUMED_NATS_URL", "nats://10.0.0.1:4222, nats://10.0.0.2:4222,nats://10.0.0.3:4222")
	t.Setenv("VOLUMED_NATS_REPLICAS", "3")
	c, err := parseConfig([]string{"--listen", "127.0.0.1:7777"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if c.csURL != "http://cloudstack.example:8080/client/api" || c.csAPIKey != "env-key" || c.csSecretKey != "env-secret" ||
		c.stepTimeout != 90*time.Second || c.syncInterval >= 0 || c.listen != "127.0.0.1:7777" || c.opRetention != 0 || c.stopGrace != 2*time.Minute ||
		c.apiToken != "from-the-environment-0123" || c.natsReplicas != 3 || !strings.Contains(c.natsURL, "10.0.0.3") {
		t.Fatalf("config %+v: environment not taken, or the flag did not win", c)
	}
}

// TestHelpHidesTheToken: --help never prints the token from the environment.
func TestHelpHidesTheToken(t *testing.T) {
	t.Setenv("VOLUMED_API_TOKEN", "secret-token-0123456789")
	var out bytes.Buffer
	if code := run([]string{"--help"}, &out); code != 0 || strings.Contains(out.String(), "secret-token") {
		t.Fatalf("exit %d; help shows the token:\n%s", code, out.String())
	}
}

// TestAnonymousNATSWarning: --nats-url without --nats-creds is not refused
// but warned about at start; with --nats-creds there is no warning. The
// agent then fails to connect either way (volumed's bus refuses an
// anonymous client; the credentials file is missing), exit 1.
func TestAnonymousNATSWarning(t *testing.T) {
	b := testenv.StartBus(t)
	for _, tc := range []struct {
		name  string
		creds []string
		warn  bool
	}{
		{"anonymous", nil, true},
		{"with credentials", []string{"--nats-creds", filepath.Join(t.TempDir(), "missing.creds")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"agent", "--vm-id", "87654321-4321-4321-4321-210987654321", "--nats-url", b.ClientURL(),
				"--name-dir", t.TempDir()}, tc.creds...)
			var out bytes.Buffer
			code := run(args, &out)
			warned := strings.Contains(out.String(), "without --nats-creds")
			if code != 1 || warned != tc.warn {
				t.Fatalf("exit %d, want 1; warned %v, want %v:\n%s", code, warned, tc.warn, out.String())
			}
		})
	}
}
