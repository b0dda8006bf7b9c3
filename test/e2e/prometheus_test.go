package e2e_test

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// scrape is one parsed scrape of the daemon's /metrics.
type scrape map[string]*dto.MetricFamily

// scrape reads and parses GET /metrics (outside /api/v1).
func (d *daemon) scrape() scrape {
	d.t.Helper()
	resp, err := http.Get(strings.TrimSuffix(d.api, "/api/v1") + "/metrics")
	if err != nil {
		d.t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		d.t.Fatalf("scrape: %d %v\n%s", resp.StatusCode, err, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		d.t.Fatalf("scrape Content-Type %q, want the text exposition", ct)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		d.t.Fatalf("parse the exposition: %v\n%s", err, body)
	}
	return fams
}

// value is the value of a counter, gauge or untyped sample, or a
// histogram's count, of the series with exactly labels (k, v pairs); -1
// when there is no such series.
func (s scrape) value(name string, labels ...string) float64 {
	fam, ok := s[name]
	if !ok {
		return -1
	}
	for _, m := range fam.Metric {
		if !hasLabels(m, labels) {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		case m.Untyped != nil:
			return m.Untyped.GetValue()
		}
	}
	return -1
}

func hasLabels(m *dto.Metric, labels []string) bool {
	if len(m.Label) != len(labels)/2 {
		return false
	}
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	for _, l := range m.Label {
		if want[l.GetName()] != l.GetValue() {
			return false
		}
	}
	return true
}

// expect is one value a scrape must show.
type expect struct {
	name   string
	labels []string
	want   float64
}

// check compares a scrape with what was done.
func (s scrape) check(t *testing.T, exps []expect) {
	t.Helper()
	for _, e := range exps {
		if got := s.value(e.name, e.labels...); got != e.want {
			t.Errorf("%s%v = %v, want %v", e.name, e.labels, got, e.want)
		}
	}
	if t.Failed() {
		names := make([]string, 0, len(s))
		for n := range s {
			if strings.HasPrefix(n, "volumed_") {
				names = append(names, n)
			}
		}
		sort.Strings(names)
		t.Logf("volumed families: %v", names)
	}
}

// TestPrometheusMetrics does known work against the daemon and checks that
// the exposition counts exactly that: operations by type and status, their
// durations, CloudStack calls and errors by command (against the
// simulator's own count), and the queue at rest and with a job in flight.
func TestPrometheusMetrics(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})

	v1, v2 := d.createVolume("prom-1", 1), d.createVolume("prom-2", 1)
	d.completed(d.submit(http.MethodPost, "/volumes/"+v1+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)
	if err := sim.SetFaults(cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{"attachVolume": {Rate: 1, Kind: "431"}}}); err != nil {
		t.Fatal(err)
	}
	if op := d.wait(d.submit(http.MethodPost, "/volumes/"+v2+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID); op.Status != commands.StatusFailed {
		t.Fatalf("attach under a 431 fault: %+v", op)
	}
	// A detach whose job lasts 3 s and is held until the queue is seen
	// with it in flight (it could end before a scrape on a loaded
	// machine); released, it ends at its due time, 3 s after it began.
	if err := sim.SetFaults(cloudsim.Faults{JobHold: map[string]bool{"detachVolume": true},
		JobDuration: map[string]cloudsim.Duration{"detachVolume": cloudsim.Duration(3 * time.Second)}}); err != nil {
		t.Fatal(err)
	}
	detach := d.submit(http.MethodPost, "/volumes/"+v1+"/detach", nil)
	testenv.Eventually(t, 30*time.Second, func() bool { return d.scrape().value("volumed_queue_in_flight") == 1 },
		"the running detach in flight on the queue")
	if err := sim.SetFaults(cloudsim.Faults{}); err != nil {
		t.Fatal(err)
	}
	d.completed(detach.ID)

	calls := sim.Stats().Calls
	var s scrape
	// Events are counted as they arrive: wait for the last one. The
	// detach's job is acknowledged only after its end is recorded and
	// published: wait for the queue to drain too.
	testenv.Eventually(t, 30*time.Second, func() bool {
		s = d.scrape()
		return s.value("volumed_operations_total", "type", "detach", "status", "completed") == 1 &&
			s.value("volumed_queue_in_flight") == 0 && s.value("volumed_queue_depth") == 0
	}, "the detach counted and its job acknowledged")
	s.check(t, []expect{
		{"volumed_operations_total", []string{"type", "create", "status", "pending"}, 2},
		{"volumed_operations_total", []string{"type", "create", "status", "completed"}, 2},
		{"volumed_operations_total", []string{"type", "attach", "status", "pending"}, 2},
		{"volumed_operations_total", []string{"type", "attach", "status", "completed"}, 1},
		{"volumed_operations_total", []string{"type", "attach", "status", "failed"}, 1},
		{"volumed_operations_total", []string{"type", "detach", "status", "pending"}, 1},
		{"volumed_operations_total", []string{"type", "delete", "status", "completed"}, 0},
		{"volumed_operation_duration_seconds", []string{"type", "create"}, 2},
		{"volumed_operation_duration_seconds", []string{"type", "attach"}, 2},
		{"volumed_operation_duration_seconds", []string{"type", "detach"}, 1},
		{"volumed_cloudstack_call_duration_seconds", []string{"command", "createVolume"}, float64(calls["createVolume"])},
		{"volumed_cloudstack_call_duration_seconds", []string{"command", "attachVolume"}, float64(calls["attachVolume"])},
		{"volumed_cloudstack_call_duration_seconds", []string{"command", "detachVolume"}, float64(calls["detachVolume"])},
		{"volumed_cloudstack_call_errors_total", []string{"command", "attachVolume"}, 1},
		{"volumed_cloudstack_call_errors_total", []string{"command", "createVolume"}, -1},
		{"volumed_queue_depth", nil, 0},
		{"volumed_queue_in_flight", nil, 0},
		{"volumed_queue_redelivered", nil, 0},
		{"volumed_nbd_connections", nil, 0},
		{"volumed_nbd_connections_total", nil, 0},
		{"volumed_correlation_duration_seconds", nil, 0},
		{"volumed_scrape_errors", []string{"source", "queue"}, 0},
	})
	if s.value("volumed_device_events_total") < 0 {
		t.Error("no volumed_device_events_total series")
	}
	if calls["createVolume"] != 2 || calls["attachVolume"] != 2 || calls["detachVolume"] != 1 {
		t.Errorf("simulator calls %v: want 2 creates, 2 attaches, 1 detach", calls)
	}
	// The detach waited 3 s for its job: its duration is in a bucket above 2.5 s.
	if h := s["volumed_operation_duration_seconds"]; h != nil {
		for _, m := range h.Metric {
			if hasLabels(m, []string{"type", "detach"}) && m.Histogram.GetSampleSum() < 3 {
				t.Errorf("detach duration %v s, want at least 3", m.Histogram.GetSampleSum())
			}
		}
	}
	// The reference's JSON metrics stay at /api/v1/metrics.
	var jm commands.Metrics
	d.mustCall(http.StatusOK, http.MethodGet, "/metrics", nil, &jm)
	if jm.OperationsByType["create"] != 2 {
		t.Fatalf("JSON metrics: %+v", jm)
	}
}

// TestPrometheusDevicesAndNBD attaches a volume to this host (a real loop
// device and uevents), exports it and moves data through NBD, then checks
// the correlation, device-event and NBD series.
func TestPrometheusDevicesAndNBD(t *testing.T) {
	requireNBDClients(t)
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("prom-local", 1)
	d.attachLocal(vol)
	m := d.requireMapped(sim, vol)
	d.exportVolume(vol, false)

	const size = 1 << 20
	data := make([]byte, size)
	_, _ = rand.Read(data)
	src := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runClient(t, "nbdcopy", src, d.nbdURI(m.PersistentDeviceName)); err != nil {
		t.Fatalf("nbdcopy to the export: %v: %s", err, out)
	}
	back := filepath.Join(t.TempDir(), "back")
	if out, err := runClient(t, "qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=1M", "count=1",
		"if="+d.nbdURI(m.PersistentDeviceName), "of="+back); err != nil {
		t.Fatalf("qemu-img dd from the export: %v: %s", err, out)
	}
	s := d.scrape()
	if got := s.value("volumed_correlation_duration_seconds"); got != 1 {
		t.Errorf("correlations observed %v, want 1 (one local attach)", got)
	}
	if got := s.value("volumed_device_events_total"); got < 1 {
		t.Errorf("device events %v, want at least the attach's add", got)
	}
	if got := s.value("volumed_nbd_connections_total"); got < 2 {
		t.Errorf("NBD connections accepted %v, want at least 2 (nbdcopy, qemu-img)", got)
	}
	if got := s.value("volumed_nbd_bytes_total", "direction", "write"); got < size {
		t.Errorf("NBD bytes written %v, want at least %d", got, size)
	}
	if got := s.value("volumed_nbd_bytes_total", "direction", "read"); got < size {
		t.Errorf("NBD bytes read %v, want at least %d", got, size)
	}
	testenv.Eventually(t, 10*time.Second, func() bool { return d.scrape().value("volumed_nbd_connections") == 0 },
		"NBD clients gone after they exited")
	if t.Failed() {
		t.Log(fmt.Sprint(s["volumed_nbd_bytes_total"]))
	}
}
