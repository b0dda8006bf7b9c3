package csapi

import (
	"context"
	"errors"
	"net"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestErrorClassification drives the real cloudstack-go client against
// recorded answers and checks each error is classified once and right.
func TestErrorClassification(t *testing.T) {
	const unknownVol = "00000000-0000-0000-0000-000000000000"
	attach := func(ctx context.Context, c *Client) error {
		_, err := c.AttachVolume(ctx, "3c5a2f1e-8b7d-4e2a-9f61-0d2b7c9e4a15", "915653c4-298b-4d74-bdee-4ced282114f1", nil)
		return err
	}
	create := func(ctx context.Context, c *Client) error {
		_, _, err := c.CreateVolume(ctx, CreateParams{Name: "v", SizeGiB: 1, DiskOfferingID: "o", ZoneID: "z"})
		return err
	}
	getVolume := func(ctx context.Context, c *Client) error {
		_, err := c.GetVolume(ctx, unknownVol)
		return err
	}
	cases := []struct {
		name      string
		script    map[string][]step
		call      func(context.Context, *Client) error
		command   string
		code      int
		csCode    int
		text      string // substring of Text
		retryable bool
		maybeDone bool
		limit     int
		after     time.Duration
		notFound  bool
	}{
		{name: "401 bad signature", script: map[string][]step{"attachVolume": {{status: 401, file: "error_401_bad_signature.json"}}},
			call: attach, command: "attachVolume", code: 401, text: "unable to verify user credentials and/or request signature"},
		{name: "431/9999 unknown id is not found", script: map[string][]step{"listVolumes": {{status: 431, file: "listVolumes_error_unknown_id_431.json"}}},
			call: getVolume, command: "listVolumes", code: 431, csCode: 9999,
			text: "Invalid parameter id value=" + unknownVol, notFound: true},
		{name: "431/4350 delete attached", script: map[string][]step{"deleteVolume": {{status: 431, file: "deleteVolume_error_attached_431.json"}}},
			call:    func(ctx context.Context, c *Client) error { return c.DeleteVolume(ctx, "v") },
			command: "deleteVolume", code: 431, csCode: 4350, text: "Please specify a volume that is not attached to any VM."},
		{name: "431/4350 delete of a removed volume is not found", script: map[string][]step{"deleteVolume": {{status: 431, file: "deleteVolume_error_removed_431.json"}}},
			call:    func(ctx context.Context, c *Client) error { return c.DeleteVolume(ctx, "v") },
			command: "deleteVolume", code: 431, csCode: 4350, text: "Unable to find volume with ID", notFound: true},
		{name: "530 internal", script: map[string][]step{"attachVolume": {{status: 530, file: "error_530_internal.json"}}},
			call: attach, command: "attachVolume", code: 530, csCode: 9999, text: "Internal error executing command", retryable: true, limit: Retries530},
		{name: "533 insufficient capacity is final with CloudStack's text", script: map[string][]step{"createVolume": {{status: 533, file: "error_533_capacity.json"}}},
			call: create, command: "createVolume", code: 533, csCode: 4250, text: "insufficient capacity"},
		{name: "HTML 503 with Retry-After is retried after it", script: map[string][]step{"createVolume": {{status: 503, file: "bad_503_unavailable.html", header: map[string]string{"Retry-After": "2"}}}},
			call: create, command: "createVolume", code: 503, retryable: true, after: 2 * time.Second},
		{name: "429 without Retry-After is retried", script: map[string][]step{"listVolumes": {{status: 429, file: "bad_503_unavailable.html"}}},
			call: getVolume, command: "listVolumes", code: 429, retryable: true},
		{name: "432 unsupported", script: map[string][]step{"listZones": {{status: 432, file: "error_432_unsupported.json"}}},
			call:    func(ctx context.Context, c *Client) error { return c.Ping(ctx) },
			command: "listZones", code: 432, csCode: 9999, text: "does not exist or it is not available"},
		{name: "connection dropped after a create was written may be done", script: map[string][]step{"createVolume": {{drop: true}}},
			call: create, command: "createVolume", text: "EOF", maybeDone: true},
		{name: "connection dropped after an attach was written may be done", script: map[string][]step{"attachVolume": {{drop: true}}},
			call: attach, command: "attachVolume", text: "EOF", maybeDone: true},
		{name: "connection dropped during a read is retried", script: map[string][]step{"listVolumes": {{drop: true}}},
			call: getVolume, command: "listVolumes", text: "EOF", retryable: true},
		{name: "proxy 502 to a create may be done", script: map[string][]step{"createVolume": {{status: 502, file: "bad_proxy_502.html"}}},
			call: create, command: "createVolume", code: 502, maybeDone: true},
		{name: "proxy 502 to a read is retried", script: map[string][]step{"listZones": {{status: 502, file: "bad_proxy_502.html"}}},
			call:    func(ctx context.Context, c *Client) error { return c.Ping(ctx) },
			command: "listZones", code: 502, retryable: true},
		{name: "truncated 200 is final", script: map[string][]step{"listVolumes": {{file: "bad_truncated_200.json"}}},
			call:    func(ctx context.Context, c *Client) error { _, err := c.ListVolumes(ctx, ListFilter{}); return err },
			command: "listVolumes", text: "invalid character"},
		{name: "failed job is final with the job's code and text",
			script:  map[string][]step{"queryAsyncJobResult": {{file: "queryAsyncJobResult_pending.json"}, {file: "queryAsyncJobResult_attachVolume_failure.json"}}},
			call:    func(ctx context.Context, c *Client) error { _, err := c.WaitJob(ctx, "j"); return err },
			command: "attachVolume", code: 431, text: "Please specify a volume that is not attached to any VM."},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, c := startReplay(t, tc.script)
			err := tc.call(ctxTimeout(t, 10*time.Second), c)
			checkError(t, err, tc.command, tc.code, tc.csCode, tc.text, tc.retryable)
			var e *Error
			if errors.As(err, &e) && (e.MaybeDone != tc.maybeDone || e.RetryLimit != tc.limit || e.RetryAfter != tc.after) {
				t.Errorf("MaybeDone %v RetryLimit %d RetryAfter %v, want %v %d %v", e.MaybeDone, e.RetryLimit, e.RetryAfter,
					tc.maybeDone, tc.limit, tc.after)
			}
			if IsMaybeDone(err) != tc.maybeDone {
				t.Errorf("IsMaybeDone = %v, want %v", IsMaybeDone(err), tc.maybeDone)
			}
			if got := errors.Is(err, ErrNotFound); got != tc.notFound {
				t.Errorf("errors.Is(err, ErrNotFound) = %v, want %v (err %v)", got, tc.notFound, err)
			}
		})
	}
}

// checkError asserts err is an *Error with the given classification.
func checkError(t *testing.T, err error, command string, code, csCode int, text string, retryable bool) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("err = %v (%T), want *Error", err, err)
	}
	if e.Command != command || e.Code != code || e.CSCode != csCode || e.Retryable != retryable {
		t.Errorf("got {Command %q Code %d CSCode %d Retryable %v}, want {%q %d %d %v}; err %v",
			e.Command, e.Code, e.CSCode, e.Retryable, command, code, csCode, retryable, err)
	}
	if !strings.Contains(e.Text, text) {
		t.Errorf("Text = %q, want it to contain %q", e.Text, text)
	}
	if IsRetryable(err) != retryable {
		t.Errorf("IsRetryable = %v, want %v", IsRetryable(err), retryable)
	}
}

// TestTransportErrors: a refused connection and an expired context are
// retryable, and the context's error stays visible.
func TestTransportErrors(t *testing.T) {
	t.Run("connection refused", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		c := New(Config{URL: "http://" + addr + "/client/api", APIKey: "k", SecretKey: "s"})
		err = c.Ping(ctxTimeout(t, 10*time.Second))
		checkError(t, err, "listZones", 0, 0, "connection refused", true)
		// A create that never reached CloudStack is not MaybeDone: it is
		// sent again.
		_, _, err = c.CreateVolume(ctxTimeout(t, 10*time.Second), CreateParams{Name: "v", DiskOfferingID: "o", ZoneID: "z"})
		checkError(t, err, "createVolume", 0, 0, "connection refused", true)
		if IsMaybeDone(err) {
			t.Errorf("refused create is MaybeDone: %v", err)
		}
	})
	t.Run("the error does not show the signed request", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		const key = "the-api-key-of-this-test"
		c := New(Config{URL: "http://" + addr + "/client/api", APIKey: key, SecretKey: "s"})
		for command, call := range map[string]func(context.Context) error{
			"listVolumes":  func(ctx context.Context) error { _, err := c.GetVolume(ctx, "v"); return err },
			"attachVolume": func(ctx context.Context) error { _, err := c.AttachVolume(ctx, "v", "m", nil); return err },
		} {
			err := call(ctxTimeout(t, 10*time.Second))
			checkError(t, err, command, 0, 0, "http://"+addr+"/client/api", true)
			for _, secret := range []string{key, "apiKey", "signature", "expires"} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("%s: the error shows %q: %v", command, secret, err)
				}
			}
		}
	})
	t.Run("context deadline while CloudStack does not answer a detach", func(t *testing.T) {
		_, c := startReplay(t, map[string][]step{"detachVolume": {{hang: true}}})
		_, err := c.DetachVolume(ctxTimeout(t, 50*time.Millisecond), "v")
		checkError(t, err, "detachVolume", 0, 0, "context deadline exceeded", false)
		if !errors.Is(err, context.DeadlineExceeded) || !IsMaybeDone(err) {
			t.Errorf("errors.Is(err, context.DeadlineExceeded) %v, IsMaybeDone %v: %v",
				errors.Is(err, context.DeadlineExceeded), IsMaybeDone(err), err)
		}
	})
	t.Run("HTTP timeout", func(t *testing.T) {
		r, _ := startReplay(t, map[string][]step{"listZones": {{hang: true}}})
		c := New(Config{URL: r.url, APIKey: "k", SecretKey: "s", HTTPTimeout: 50 * time.Millisecond})
		err := c.Ping(ctxTimeout(t, time.Minute))
		checkError(t, err, "listZones", 0, 0, "context deadline exceeded", true)
	})
}

// TestSideEffectNotResent: net/http sends an idempotent request (GET) again
// by itself when a kept-alive connection closes after the request was
// written. A create (cloudstack-go POSTs it) must reach CloudStack once and
// come back MaybeDone.
func TestSideEffectNotResent(t *testing.T) {
	r, c := startReplay(t, map[string][]step{
		"listZones":    {{file: "listZones.json"}},
		"createVolume": {{drop: true}, {file: "createVolume_initial.json"}},
	})
	ctx := ctxTimeout(t, 10*time.Second)
	if err := c.Ping(ctx); err != nil { // leaves a kept-alive connection
		t.Fatal(err)
	}
	_, _, err := c.CreateVolume(ctx, CreateParams{Name: "v", SizeGiB: 1, DiskOfferingID: "o", ZoneID: "z"})
	if !IsMaybeDone(err) {
		t.Fatalf("create with a lost answer: %v, want MaybeDone", err)
	}
	if n := r.requests(); n != 2 {
		t.Fatalf("%d requests reached CloudStack, want 2 (listZones, one createVolume)", n)
	}
}

// TestJobCommand: a job's Java class names its API command.
func TestJobCommand(t *testing.T) {
	for cmd, want := range map[string]string{
		"org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd":         "attachVolume",
		"org.apache.cloudstack.api.command.admin.volume.ResizeVolumeCmdByAdmin": "resizeVolume",
		"org.apache.cloudstack.api.command.user.snapshot.CreateSnapshotCmd":     "createSnapshot",
		"org.apache.cloudstack.api.command.user.tag.DeleteTagsCmd":              "deleteTags",
		"org.apache.cloudstack.api.command.user.vm.StartVMCmd":                  "startVirtualMachine",
		"org.apache.cloudstack.api.command.admin.vm.StopVMCmdByAdmin":           "stopVirtualMachine",
		"": "queryAsyncJobResult",
	} {
		if got := jobCommand(cmd); got != want {
			t.Errorf("jobCommand(%q) = %q, want %q", cmd, got, want)
		}
	}
}

// TestCallStateNotShared: calls reuse pooled cloudstack-go clients, but
// what one call's requests recorded never reaches the next. A detach whose
// answer is lost was written (MaybeDone); a create after it, refused
// before anything was written, is retryable and not MaybeDone.
func TestCallStateNotShared(t *testing.T) {
	r := &replay{t: t, script: map[string][]step{"detachVolume": {{drop: true}}}}
	srv := httptest.NewServer(r)
	defer srv.Close()
	r.url = srv.URL + "/client/api"
	c := New(Config{URL: r.url, APIKey: "key", SecretKey: "secret"})
	_, err := c.DetachVolume(ctxTimeout(t, 10*time.Second), "v")
	if !IsMaybeDone(err) {
		t.Fatalf("detach with a lost answer: %v, want MaybeDone", err)
	}
	srv.Close()
	_, _, err = c.CreateVolume(ctxTimeout(t, 10*time.Second), CreateParams{Name: "v", DiskOfferingID: "o", ZoneID: "z"})
	checkError(t, err, "createVolume", 0, 0, "connection refused", true)
	if IsMaybeDone(err) {
		t.Errorf("refused create after a lost detach is MaybeDone: %v", err)
	}
}
