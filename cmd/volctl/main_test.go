package main

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"5GiB", 5 << 30, true},
		{"5G", 5 << 30, true},
		{"5gib", 5 << 30, true},
		{"1024MiB", 1 << 30, true},
		{"1.5TiB", 3 << 39, true},
		{"5GB", 5e9, true},
		{"5368709120", 5368709120, true},
		{"512B", 512, true},
		{" 2 GiB ", 2 << 30, true},
		{"", 0, false},
		{"0", 0, false},
		{"-1G", 0, false},
		{"5XB", 0, false},
		{"GiB", 0, false},
		{"99999999999TiB", 0, false},
	}
	for _, tc := range tests {
		got, err := parseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

// TestUsage checks the exit codes of command lines refused before any
// request is made.
func TestUsage(t *testing.T) {
	tests := []struct {
		args []string
		code int
		say  string
	}{
		{nil, exitUsage, "no command"},
		{[]string{"frobnicate"}, exitUsage, "unknown command"},
		{[]string{"volume"}, exitUsage, "unknown command"},
		{[]string{"volume", "attach", "v"}, exitUsage, "--vm is required"},
		{[]string{"volume", "attach", "v", "w", "--vm", "x"}, exitUsage, "want 1 argument"},
		{[]string{"volume", "create", "--name", "n", "--size", "5GiB"}, exitUsage, "--disk-offering, --zone required"},
		{[]string{"volume", "create", "--name", "n", "--size", "big", "--zone", "z", "--disk-offering", "o"}, exitUsage, "--size"},
		{[]string{"volume", "create", "--metadata", "novalue"}, exitUsage, "k=v"},
		{[]string{"volume", "get", "v", "-o", "yaml"}, exitUsage, "table or json"},
		{[]string{"volume", "get", "v", "--wait"}, exitUsage, "not defined"},
		{[]string{"device"}, exitUsage, "give a volume ID"},
		{[]string{"device", "v", "--path", "/dev/vdb"}, exitUsage, "give a volume ID"},
		{[]string{"health", "--server", "ftp://x"}, exitUsage, "http or https"},
		{[]string{"volume", "detach", "v", "--idempotency-key", "a key"}, exitUsage, "--idempotency-key"},
		{[]string{"volume", "get", "v", "--idempotency-key", "k"}, exitUsage, "not defined"},
		{[]string{"help"}, exitOK, "Usage:"},
		{[]string{"--server", "ftp://x", "health"}, exitUsage, "http or https"},
		{[]string{"-o=yaml", "volume", "get", "v"}, exitUsage, "table or json"},
		{[]string{"--timeout", "1s", "--wait", "volume", "get", "v"}, exitUsage, "not defined"},
		{[]string{"--server"}, exitUsage, "unknown command"},
		{[]string{"--server", "http://x", "--version"}, exitOK, "volctl "},
		{[]string{"volume", "--help"}, exitOK, "Usage:"},
		{[]string{"op", "help"}, exitOK, "Usage:"},
		{[]string{"volume", "create", "--help"}, exitOK, "Usage:"},
		{[]string{"--version"}, exitOK, "volctl "},
	}
	for _, tc := range tests {
		var out, errb bytes.Buffer
		code := run(context.Background(), tc.args, &out, &errb)
		if code != tc.code || !strings.Contains(out.String()+errb.String(), tc.say) {
			t.Errorf("volctl %v: exit %d, want %d saying %q\nstdout: %s\nstderr: %s", tc.args, code, tc.code, tc.say, out.String(), errb.String())
		}
	}
}

// TestNATSAuthorizationViolation: volumed's bus refuses volctl without
// credentials, and volctl says which flag to pass; with the operator's it
// connects (and fails later, on the unreachable REST server, without that
// advice).
func TestNATSAuthorizationViolation(t *testing.T) {
	b := testenv.StartBus(t)
	tests := []struct {
		name   string
		creds  string
		advice bool
	}{
		{"no credentials", "", true},
		{"operator credentials", b.CredsFile(bus.RoleOperator), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			code := run(ctx, []string{"op", "watch", "op-00000000-0000-0000-0000-000000000000",
				"--server", "http://127.0.0.1:1", "--timeout", "5s", "--nats", b.ClientURL(), "--nats-creds=" + tc.creds}, &out, &errb)
			advised := strings.Contains(errb.String(), "pass --nats-creds")
			if code != exitFailed || advised != tc.advice || strings.Contains(strings.ToLower(errb.String()), "authorization violation") != tc.advice {
				t.Fatalf("exit %d, want %d; advice %v, want %v\nstderr: %s", code, exitFailed, advised, tc.advice, errb.String())
			}
		})
	}
}

// TestIdempotencyKeyFlag: --idempotency-key goes out as the
// Idempotency-Key header of the command, and no key without the flag.
func TestIdempotencyKeyFlag(t *testing.T) {
	keys := make(chan string, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		keys <- r.Header.Get(commands.IdempotencyKeyHeader)
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write([]byte(`{"id":"op-1","type":"detach","status":"pending"}`))
	}))
	defer srv.Close()
	for _, key := range []string{"job-7", ""} {
		args := []string{"volume", "detach", "v1", "--server", srv.URL, "-o", "json"}
		if key != "" {
			args = append(args, "--idempotency-key", key)
		}
		var out, errb bytes.Buffer
		if code := run(context.Background(), args, &out, &errb); code != exitOK {
			t.Fatalf("volctl %v: exit %d\nstderr: %s", args, code, errb.String())
		}
		if got := <-keys; got != key {
			t.Errorf("volctl %v sent Idempotency-Key %q, want %q", args, got, key)
		}
	}
}

// TestForceFlag: --force on detach and delete sends {"force":true}.
func TestForceFlag(t *testing.T) {
	bodies := make(chan string, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		bodies <- strings.TrimSpace(string(b))
		w.WriteHeader(http.StatusCreated)
		_, _ = w.Write([]byte(`{"id":"op-1","type":"detach","status":"pending"}`))
	}))
	defer srv.Close()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"volume", "detach", "v1", "--force"}, `{"force":true}`},
		{[]string{"volume", "delete", "v1", "--force"}, `{"force":true}`},
		{[]string{"volume", "detach", "v1"}, `{}`},
	} {
		args := append(tc.args, "--server", srv.URL, "-o", "json")
		var out, errb bytes.Buffer
		if code := run(context.Background(), args, &out, &errb); code != exitOK {
			t.Fatalf("volctl %v: exit %d\nstderr: %s", args, code, errb.String())
		}
		if got := <-bodies; got != tc.want {
			t.Errorf("volctl %v sent %s, want %s", args, got, tc.want)
		}
	}
}

// TestWaitFailedSaysItOnce: --wait on an operation that fails prints its
// error and details on stderr once, and exits 1.
func TestWaitFailedSaysItOnce(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write([]byte(`{"id":"op-1","type":"delete","status":"pending"}`))
			return
		}
		_, _ = w.Write([]byte(`{"id":"op-1","type":"delete","status":"failed","error":"volume is attached: detach it first","details":{"code":"CONFLICT"}}`))
	}))
	defer srv.Close()
	args := []string{"volume", "delete", "v1", "--wait", "--server", srv.URL}
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	if n := strings.Count(errb.String(), "volctl: operation op-1 failed"); code != exitFailed || n != 1 ||
		strings.Count(errb.String(), `details: {"code":"CONFLICT"}`) != 1 {
		t.Fatalf("volctl %v: exit %d, want %d, the error said %d times, want once\nstderr: %s", args, code, exitFailed, n, errb.String())
	}
}

// TestVolumeListByVMShowsNames: volume list --vm shows each volume's
// CloudStack name (GET /volumes rows carry it, GET /vms/{id}/volumes rows
// do not, as the reference shows them), and a VM CloudStack does not know
// is still NOT_FOUND, not an empty list nor the CloudStack error the
// listing by it is.
func TestVolumeListByVMShowsNames(t *testing.T) {
	const row = `{"volume_id":"vol-a","vm_id":"vm-1","device_path":"/dev/vdb","state":"Ready","size":1073741824,"tags":{}`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.URL.Path == "/api/v1/volumes" && r.URL.Query().Get("vm_id") == "vm-1":
			_, _ = w.Write([]byte(`[` + row + `,"cloudstack_data":{"id":"vol-a","name":"data-a"}}]`))
		case r.URL.Path == "/api/v1/volumes" && r.URL.Query().Get("vm_id") == "vm-gone":
			// As volumed answers: CloudStack refuses to list by a VM it
			// does not know.
			w.WriteHeader(http.StatusUnprocessableEntity)
			_, _ = w.Write([]byte(`{"error":"CloudStack listVolumes failed: Unable to execute API command listvolumes due to invalid value. Invalid parameter virtualmachineid value=vm-gone due to incorrect long value format, or entity does not exist or due to incorrect parameter annotation for the field in api cmd class.","code":"CLOUDSTACK_ERROR"}`))
		case r.URL.Path == "/api/v1/volumes":
			_, _ = w.Write([]byte(`[]`))
		case r.URL.Path == "/api/v1/vms/vm-1/volumes":
			_, _ = w.Write([]byte(`[` + row + `}]`))
		case r.URL.Path == "/api/v1/vms/vm-empty/volumes":
			_, _ = w.Write([]byte(`[]`))
		default:
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"error":"vm vm-gone not found","code":"NOT_FOUND"}`))
		}
	}))
	defer srv.Close()
	for _, tc := range []struct {
		vm   string
		code int
		want string
	}{
		{"vm-1", exitOK, "data-a"},
		{"vm-empty", exitOK, "VOLUME"},
		{"vm-gone", exitFailed, "NOT_FOUND"},
	} {
		args := []string{"volume", "list", "--vm", tc.vm, "--server", srv.URL}
		var out, errb bytes.Buffer
		code := run(context.Background(), args, &out, &errb)
		if code != tc.code || !strings.Contains(out.String()+errb.String(), tc.want) {
			t.Errorf("volctl %v: exit %d, want %d with %q\nstdout: %s\nstderr: %s", args, code, tc.code, tc.want, out.String(), errb.String())
		}
	}
}
