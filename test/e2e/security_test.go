package e2e_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestNATSAuthorization: the bus lets in no anonymous client; the
// operator cannot purge the job queue or delete the state bucket; an
// agent identity cannot publish another VM's device events; volumed keeps
// working through all of it.
func TestNATSAuthorization(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	ctx := context.Background()

	for _, role := range []string{bus.RoleDaemon, bus.RoleOperator, bus.RoleObserver} {
		if fi, err := os.Stat(d.credsFile(role)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s credentials: %v %v, want mode 0600", role, fi, err)
		}
	}

	t.Run("anonymous client", func(t *testing.T) {
		nc, err := nats.Connect(d.natsURL, nats.NoReconnect())
		if err == nil {
			defer nc.Close()
			if _, err := nc.Request(commands.SubjectForceSync, nil, 2*time.Second); err == nil {
				t.Fatal("an anonymous client sent a command")
			}
			t.Fatal("an anonymous client connected")
		}
		if !errors.Is(err, nats.ErrAuthorization) {
			t.Fatalf("anonymous connect: %v, want an authorization violation", err)
		}
	})

	t.Run("operator cannot purge or delete", func(t *testing.T) {
		v := &testenv.Violations{}
		js, err := jetstream.New(d.natsAs(bus.RoleOperator, nats.ErrorHandler(v.Handler)))
		if err != nil {
			t.Fatal(err)
		}
		v.Refused(t, "$JS.API.STREAM.PURGE."+bus.StreamJobs, func(ctx context.Context) error {
			s, err := js.Stream(ctx, bus.StreamJobs)
			if err != nil {
				return err
			}
			return s.Purge(ctx)
		})
		v.Refused(t, "$JS.API.STREAM.DELETE.KV_"+state.DefaultKVBucket, func(ctx context.Context) error {
			return js.DeleteKeyValue(ctx, state.DefaultKVBucket)
		})
		v.Refused(t, "$JS.API.STREAM.DELETE."+bus.StreamOps, func(ctx context.Context) error {
			return js.DeleteStream(ctx, bus.StreamOps)
		})
		// The state bucket and the queue are whole: a create runs to the end.
		d.createVolume("after-the-operator-tried", 1)
	})

	t.Run("agent identity", func(t *testing.T) {
		creds := filepath.Join(t.TempDir(), "remote.creds")
		if out, err := exec.Command(volumedBin, "creds", "agent", "--vm-id", "vm-"+cloudsim.RemoteVMID,
			"--data-dir", d.dataDir, "--out", creds).CombinedOutput(); err != nil {
			t.Fatalf("volumed creds agent: %v\n%s", err, out)
		}
		if fi, err := os.Stat(creds); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("agent credentials: %v %v, want mode 0600", fi, err)
		}
		v := &testenv.Violations{}
		nc, err := nats.Connect(d.natsURL, nats.UserCredentials(creds), nats.ErrorHandler(v.Handler),
			nats.CustomInboxPrefix(bus.AgentInboxPrefix(cloudsim.RemoteVMID)))
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(ctx, commands.DeviceSubject(cloudsim.RemoteVMID, "change"), []byte(`{"name":"vdz"}`)); err != nil {
			t.Fatalf("the agent's own device event: %v", err)
		}
		forged := commands.DeviceSubject(cloudsim.ApplianceVMID, "add")
		v.Refused(t, forged, func(ctx context.Context) error {
			_, err := js.Publish(ctx, forged, []byte(`{"name":"forged-by-another-vm"}`))
			return err
		})
		djs, err := jetstream.New(d.natsAs(bus.RoleDaemon))
		if err != nil {
			t.Fatal(err)
		}
		s, err := djs.Stream(ctx, bus.StreamDevices)
		if err != nil {
			t.Fatal(err)
		}
		if m, err := s.GetLastMsgForSubject(ctx, forged); err == nil && strings.Contains(string(m.Data), "forged") {
			t.Fatalf("the forged event is in the device stream: %s", m.Data)
		}
		// Nor may it send commands.
		v.Refused(t, commands.SubjectForceSync, func(ctx context.Context) error {
			_, err := nc.RequestWithContext(ctx, commands.SubjectForceSync, nil)
			return err
		})
	})
}

// TestEventsReplayedOntoRequestsIgnored: an observer may make consumers on
// the event streams, and a push consumer delivers to any subject; copies
// it delivers onto the agent's list subject or a command are not taken as
// requests (a stored event read as a names request would wipe the names).
func TestEventsReplayedOntoRequestsIgnored(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	d.createVolume("an-event-to-replay", 1) // puts events in VOLUMED_OPS
	js, err := d.natsAs(bus.RoleObserver).JetStream()
	if err != nil {
		t.Fatal(err)
	}
	operator := d.natsAs(bus.RoleOperator)
	daemonConn := d.natsAs(bus.RoleDaemon)
	for _, tc := range []struct {
		deliver, group string
		control        func() error
	}{
		{commands.DevicesListSubject(cloudsim.ApplianceVMID), "", func() error {
			_, err := daemonConn.Request(commands.DevicesListSubject(cloudsim.ApplianceVMID), nil, 10*time.Second)
			return err
		}},
		{commands.SubjectForceSync, handlers.QueueGroup, func() error {
			_, err := operator.Request(commands.SubjectForceSync, nil, 60*time.Second)
			return err
		}},
	} {
		t.Run(tc.deliver, func(t *testing.T) {
			// A reply to the copy would go to its ack subject.
			name := "replay-" + strings.NewReplacer(".", "-", "-", "").Replace(tc.deliver)
			replies := make(chan *nats.Msg, 4)
			sub, err := daemonConn.ChanSubscribe("$JS.ACK."+bus.StreamOps+"."+name+".>", replies)
			if err != nil {
				t.Fatal(err)
			}
			defer sub.Unsubscribe()
			if err := daemonConn.Flush(); err != nil {
				t.Fatal(err)
			}
			if _, err := js.AddConsumer(bus.StreamOps, &nats.ConsumerConfig{Name: name, DeliverSubject: tc.deliver,
				DeliverGroup: tc.group, AckPolicy: nats.AckExplicitPolicy, DeliverPolicy: nats.DeliverLastPolicy,
				MaxDeliver: 1}); err != nil {
				t.Fatalf("observer push consumer: %v", err)
			}
			testenv.Eventually(t, 30*time.Second, func() bool {
				info, err := js.ConsumerInfo(bus.StreamOps, name)
				return err == nil && info.Delivered.Consumer == 1
			}, "the observer's consumer delivered its copy to %s", tc.deliver)
			// The subscriber takes messages in order: once a real request
			// is answered, the copy before it has been handled, and a
			// reply to it would have come before the flush ends.
			if err := tc.control(); err != nil {
				t.Fatalf("real request on %s: %v", tc.deliver, err)
			}
			if err := daemonConn.Flush(); err != nil {
				t.Fatal(err)
			}
			select {
			case m := <-replies:
				t.Fatalf("the copy delivered to %s was answered: %s", tc.deliver, m.Data)
			default:
			}
		})
	}
}

// TestRESTSecurity: off loopback the API wants its token on every route
// but /health and /openapi.json; a cross-site POST is refused even with
// it; huge and overflowing sizes are 400.
func TestRESTSecurity(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{offLoopback: true})
	if fi, err := os.Stat(filepath.Join(d.dataDir, "api-token")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("generated API token: %v %v, want mode 0600", fi, err)
	}
	send := func(method, path string, headers map[string]string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, d.api+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range headers {
			req.Header.Set(k, v)
		}
		resp, body := validator.Do(t, &http.Client{Transport: d.transport()}, req)
		var e commands.Error
		_ = json.Unmarshal(body, &e)
		return resp.StatusCode, e.Code
	}
	vol := d.createVolume("guarded", 1)
	auth := map[string]string{"Authorization": "Bearer " + d.token}
	tests := []struct {
		name         string
		method, path string
		headers      map[string]string
		status       int
		code         string
	}{
		{"health without token", "GET", "/health", nil, 200, ""},
		{"openapi without token", "GET", "/openapi.json", nil, 200, ""},
		{"read without token", "GET", "/volumes/" + vol, nil, 401, commands.CodeUnauthorized},
		{"detach without token", "POST", "/volumes/" + vol + "/detach", nil, 401, commands.CodeUnauthorized},
		{"force-sync with a wrong token", "POST", "/admin/force-sync", map[string]string{"Authorization": "Bearer " + strings.Repeat("0", 64)}, 401, commands.CodeUnauthorized},
		{"cross-site detach with the token", "POST", "/volumes/" + vol + "/detach",
			map[string]string{"Authorization": auth["Authorization"], "Sec-Fetch-Site": "cross-site"}, 403, commands.CodeForbidden},
		{"detach from another origin with the token", "POST", "/volumes/" + vol + "/detach",
			map[string]string{"Authorization": auth["Authorization"], "Origin": "http://evil.example"}, 403, commands.CodeForbidden},
		{"read with the token", "GET", "/volumes/" + vol, auth, 200, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if status, code := send(tc.method, tc.path, tc.headers); status != tc.status || code != tc.code {
				t.Fatalf("%s %s: %d %s, want %d %s", tc.method, tc.path, status, code, tc.status, tc.code)
			}
		})
	}
	// None of the refused detaches was recorded.
	var ops []commands.Operation
	d.mustCall(http.StatusOK, http.MethodGet, "/operations?volume_id="+vol, nil, &ops)
	if len(ops) != 1 || ops[0].Type != commands.OpCreate {
		t.Fatalf("operations of %s after refused requests: %+v", vol, ops)
	}
	for _, size := range []string{"70368744177665", "9223372036854775807", "9223372036854775808", "1e300"} {
		status, data := d.call(http.MethodPost, "/volumes", `{"name":"huge","size":`+size+`,"disk_offering_id":"`+
			cloudsim.CustomOfferingID+`","zone_id":"`+cloudsim.ZoneID+`"}`)
		var e commands.Error
		if status != http.StatusBadRequest || json.Unmarshal(data, &e) != nil || e.Details["field"] != "size" {
			t.Fatalf("create of size %s: %d %s, want 400 on size", size, status, data)
		}
	}
}

// TestRefusesOffLoopbackWithoutToken: an empty token file is not a token.
func TestRefusesOffLoopbackWithoutToken(t *testing.T) {
	empty := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// Refused at start, before CloudStack is ever called: no simulator needed.
	out, err := exec.Command(volumedBin, "--cloudstack-url", "http://127.0.0.1:1"+cloudsim.APIPath,
		"--cloudstack-api-key", cloudsim.DefaultAPIKey, "--cloudstack-secret-key", cloudsim.DefaultSecretKey,
		"--listen", "0.0.0.0:0", "--data-dir", t.TempDir(), "--api-token-file", empty).CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(string(out), "api-token-file") {
		t.Fatalf("volumed off loopback with an empty token file: %v\n%s", err, out)
	}
}
