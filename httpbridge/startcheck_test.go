package httpbridge_test

import (
	"context"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/correlate"
	"github.com/volumed/volumed/internal/testenv"
)

// TestMappingReadsAfterStart: a detected mapping recorded before volumed
// started, whose disk is gone now (the VM's agent lists none), is never
// named by a read after the start. A read waits for the heal at start and
// answers what the heal left; a read the heal does not finish within is
// 503 SERVICE_UNAVAILABLE, and the reads after the heal answer what it
// left. The agent answers the correlator's names request, after which
// the heal runs, only when the test lets it.
func TestMappingReadsAfterStart(t *testing.T) {
	for _, tc := range []struct {
		name string
		path string
		// healed: the heal may finish while the first read waits;
		// otherwise only once the first read is answered.
		healed bool
		first  int // the first read's status
		after  int // the status once healed
	}{
		{"device read, healed meanwhile", "/devices/dev%2Fvdb/volume", true, http.StatusNotFound, http.StatusNotFound},
		{"volume's device read, healed meanwhile", "/volumes/" + vol1 + "/device", true, http.StatusOK, http.StatusOK},
		{"device read, not healed in time", "/devices/dev%2Fvdb/volume", false, http.StatusServiceUnavailable, http.StatusNotFound},
		{"volume's device read, not healed in time", "/volumes/" + vol1 + "/device", false, http.StatusServiceUnavailable, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			// The read timeout the first read waits out when the heal is
			// held; one the heal can take on a loaded machine otherwise.
			timeout := 500 * time.Millisecond
			if tc.healed {
				timeout = 10 * time.Second
			}
			h := newHarness(t, options{queryTimeout: timeout})
			h.seedMapping(t, vol1, "/dev/vdb")
			release := make(chan struct{})
			var once sync.Once
			let := func() { once.Do(func() { close(release) }) }
			defer let()
			for subject, answer := range map[string]func(*nats.Msg){
				commands.DevicesListSubject(vm1): func(m *nats.Msg) { _ = m.Respond([]byte("[]")) },
				commands.DevicesNamesSubject(vm1): func(m *nats.Msg) {
					go func() {
						select {
						case <-release:
							_ = m.Respond([]byte(`{"names":{}}`))
						case <-ctx.Done():
						}
					}()
				},
			} {
				sub, err := h.bus.Subscribe(subject, answer)
				if err != nil {
					t.Fatal(err)
				}
				defer sub.Unsubscribe()
			}
			c := correlate.New(correlate.Config{Conn: h.bus, Store: h.store, LocalVMID: vm1, Logger: testLogger(t)})
			if err := c.Start(ctx); err != nil {
				t.Fatal(err)
			}
			defer c.Close(context.Background())
			h.backend.setStartCheck(func(ctx context.Context, vm string) (bool, error) {
				if tc.healed {
					let()
				}
				return c.AwaitStartCheck(ctx, vm)
			})
			resp, body := h.do(t, "GET", tc.path, "")
			checkUnnamed(t, resp, body, tc.first)
			let()
			testenv.Eventually(t, 10*time.Second, func() bool {
				resp, _ := h.do(t, "GET", tc.path, "")
				return resp.StatusCode == tc.after
			}, "GET %s answers %d once healed", tc.path, tc.after)
			resp, body = h.do(t, "GET", tc.path, "")
			checkUnnamed(t, resp, body, tc.after)
		})
	}
}

// checkUnnamed checks that a mapping read answered status and does not
// name /dev/vdb: an error in the documented format, or a mapping without
// device, missing.
func checkUnnamed(t *testing.T, resp *http.Response, body []byte, status int) {
	t.Helper()
	if resp.StatusCode != status {
		t.Fatalf("status %d (%s), want %d", resp.StatusCode, body, status)
	}
	switch status {
	case http.StatusOK:
		if m := decodeAs[commands.Mapping](t, body); m.DevicePath != "" || m.LinuxState != commands.LinuxMissing {
			t.Fatalf("mapping %s names a disk that is gone; want it missing", body)
		}
	case http.StatusServiceUnavailable:
		if e := decodeAs[apiErr](t, body); e.Code != commands.CodeServiceUnavailable || e.Details["vm_id"] != vm1 {
			t.Fatalf("503 body %s, want code %s naming VM %s", body, commands.CodeServiceUnavailable, vm1)
		}
	default:
		if e := decodeAs[apiErr](t, body); e.Code != commands.CodeNotFound {
			t.Fatalf("%d body %s, want code %s", status, body, commands.CodeNotFound)
		}
	}
}
