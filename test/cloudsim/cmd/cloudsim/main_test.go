package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/apache/cloudstack-go/v2/cloudstack"

	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestHelpDocumentsEveryFlag: --help names every flag and its env variable scheme.
func TestHelpDocumentsEveryFlag(t *testing.T) {
	var out bytes.Buffer
	_, _, err := parse([]string{"--help"}, func(string) string { return "" }, &out)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("err = %v", err)
	}
	for _, name := range []string{"listen", "api-key", "secret-key", "state-dir", "inventory", "local-devices",
		"anonymous-backing-files", "job-duration", "job-jitter", "seed", "outage", "latency", "errors",
		"job-durations", "job-failure-rate", "job-hang-rate", "log-level", "CLOUDSIM_"} {
		if !strings.Contains(out.String(), name) {
			t.Errorf("--help lacks %q", name)
		}
	}
}

// TestEnvAndFlags: the environment fills flags not given; flags win.
func TestEnvAndFlags(t *testing.T) {
	env := map[string]string{
		"CLOUDSIM_LISTEN":           "127.0.0.1:9999",
		"CLOUDSIM_API_KEY":          "from-env",
		"CLOUDSIM_JOB_DURATION":     "2s",
		"CLOUDSIM_ERRORS":           "attachVolume=0.5:530",
		"CLOUDSIM_OUTAGE":           "true",
		"CLOUDSIM_SEED":             "42",
		"CLOUDSIM_JOB_FAILURE_RATE": "detachVolume=1",
	}
	cfg, _, err := parse([]string{"--listen", "127.0.0.1:7777"}, func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:7777" || cfg.APIKey != "from-env" || cfg.JobDuration != 2*time.Second ||
		cfg.Faults.Errors["attachVolume"].Kind != "530" || !cfg.Faults.Outage || cfg.Seed != 42 ||
		cfg.Faults.JobFailureRate["detachVolume"] != 1 {
		t.Fatalf("cfg = %+v", cfg)
	}
	for _, bad := range [][]string{{"--errors", "attachVolume=2:530"}, {"--inventory", "testdata/none.json"}, {"stray-arg"}} {
		if _, _, err := parse(bad, func(string) string { return "" }, io.Discard); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
	if _, _, err := parse(nil, func(k string) string {
		return map[string]string{"CLOUDSIM_JOB_JITTER": "lots"}[k]
	}, io.Discard); err == nil || !strings.Contains(err.Error(), "CLOUDSIM_JOB_JITTER") {
		t.Errorf("bad env value: %v", err)
	}
}

// TestRunServes: the binary's run serves the API until its context ends.
func TestRunServes(t *testing.T) {
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--listen", addr, "--state-dir", t.TempDir(), "--local-devices", "off", "--log-level", "warn"},
			func(string) string { return "" }, io.Discard)
	}()
	cs := cloudstack.NewClient("http://"+addr+cloudsim.APIPath, cloudsim.DefaultAPIKey, cloudsim.DefaultSecretKey, false)
	testenv.Eventually(t, 10*time.Second, func() bool {
		_, err := cs.Configuration.ListCapabilities(cs.Configuration.NewListCapabilitiesParams())
		return err == nil
	}, "listCapabilities answers on %s", addr)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("run did not return after cancel")
	}
}

// TestBinary builds the binary, runs it on a free port, calls it with the
// unmodified cloudstack-go client, then stops it with SIGTERM: it logs its
// URL and credentials at start, keeps its state in --state-dir and exits 0.
func TestBinary(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "cloudsim")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	stateDir := t.TempDir()
	out := &testenv.Buffer{}
	cmd := exec.Command(bin, "--listen", addr, "--state-dir", stateDir, "--local-devices", "off")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	cs := cloudstack.NewClient("http://"+addr+cloudsim.APIPath, cloudsim.DefaultAPIKey, cloudsim.DefaultSecretKey, false)
	testenv.Eventually(t, 15*time.Second, func() bool {
		_, err := cs.Configuration.ListCapabilities(cs.Configuration.NewListCapabilitiesParams())
		return err == nil
	}, "listCapabilities answers on %s:\n%s", addr, out)
	zones, err := cs.Zone.ListZones(cs.Zone.NewListZonesParams())
	if err != nil || zones.Count != 1 || zones.Zones[0].Id != cloudsim.ZoneID {
		t.Fatalf("listZones: %+v %v", zones, err)
	}
	for _, want := range []string{"api=http://" + addr + cloudsim.APIPath, "api_key=" + cloudsim.DefaultAPIKey,
		"secret_key=" + cloudsim.DefaultSecretKey, "appliance_vm=" + cloudsim.ApplianceVMID} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("the start log lacks %q:\n%s", want, out)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, out)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("no exit within 15s of SIGTERM:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(stateDir, "state.json")); err != nil {
		t.Errorf("state: %v", err)
	}
}
