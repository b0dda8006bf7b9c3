package state

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
)

// scanRecords are the records of testdata/records: whether the scanner
// must read each itself (fast) and whether encoding/json refuses it (bad).
// Every record must agree with encoding/json either way.
var scanRecords = map[string]struct{ fast, bad bool }{
	"current.json":             {fast: true},
	"old-no-requester.json":    {fast: true}, // before requested_by; escapes in a field not indexed
	"old-pending-null-vm.json": {fast: true},
	"workflow.json":            {fast: true}, // numbers, literals, nesting
	"unicode-raw.json":         {fast: true},
	"unknown-fields.json":      {fast: true}, // indexed names inside an unknown field
	"nulls.json":               {fast: true},
	"pretty.json":              {fast: true},
	"duplicate-keys.json":      {fast: true}, // the last wins, null keeps a string
	"escapes.json":             {},
	"case-variant-key.json":    {}, // encoding/json matches names in any case
	"escaped-key.json":         {},
	"invalid-utf8.json":        {},
	"null-record.json":         {},
	"bad-truncated.json":       {bad: true},
	"bad-not-json.json":        {bad: true},
	"bad-type.json":            {bad: true},
	"bad-time.json":            {bad: true},
	"bad-skipped-field.json":   {bad: true},
	"bad-trailing.json":        {bad: true},
	"bad-escape.json":          {bad: true},
}

// indexedJSON shows o as JSON: two values show the same iff they are
// equal, times to the nanosecond and in their offsets, and pointers nil
// alike.
func indexedJSON(t testing.TB, o *kvIndexed) string {
	t.Helper()
	b, err := json.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// indexed is what o holds as encoding/json decodes it.
func (o *scannedOp) indexed() kvIndexed {
	x := kvIndexed{Type: commands.OpType(o.typ), Status: commands.OpStatus(o.status), VolumeID: string(o.volume),
		RequestedBy: string(o.by), CreatedAt: o.created, UpdatedAt: o.updated}
	if o.hasVM {
		vm := string(o.vm)
		x.VMID = &vm
	}
	if o.hasCompleted {
		x.CompletedAt = &o.completed
	}
	return x
}

// checkScan fails unless scanIndexed agrees with encoding/json on raw, and
// returns whether the scanner read it itself and whether json refused it.
func checkScan(t testing.TB, raw []byte) (fast, bad bool) {
	t.Helper()
	var want kvIndexed
	werr := json.Unmarshal(raw, &want)
	var sc scannedOp
	fast = scanIndexed(raw, &sc)
	got := sc.indexed()
	if fast && werr != nil {
		t.Fatalf("scanner read %q, which encoding/json refuses: %v", raw, werr)
	}
	if fast && indexedJSON(t, &got) != indexedJSON(t, &want) {
		t.Fatalf("scanner read %q as\n%s\nencoding/json as\n%s", raw, indexedJSON(t, &got), indexedJSON(t, &want))
	}
	if fast {
		op := want.operation("op-1")
		f, wf := sc.fields(), fieldsOf(&op)
		g := opFields[string]{typ: string(f.typ), status: string(f.status), volume: string(f.volume), vm: string(f.vm),
			by: string(f.by), created: f.created, completed: f.completed, duration: f.duration}
		if g != wf {
			t.Fatalf("index fields of %q: %+v from the scanner, %+v from encoding/json", raw, g, wf)
		}
	}
	return fast, werr != nil
}

// TestScanIndexed: the scanner reads the records every release wrote
// itself, exactly as encoding/json does, and leaves the others to it.
func TestScanIndexed(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "records", "*.json"))
	if err != nil || len(files) != len(scanRecords) {
		t.Fatalf("testdata records: %d files (%v), %d in the table", len(files), err, len(scanRecords))
	}
	for _, f := range files {
		name := filepath.Base(f)
		t.Run(strings.TrimSuffix(name, ".json"), func(t *testing.T) {
			want, ok := scanRecords[name]
			if !ok {
				t.Fatalf("%s is not in the table", name)
			}
			raw, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if fast, bad := checkScan(t, raw); fast != want.fast || bad != want.bad {
				t.Errorf("read by the scanner %v, refused by encoding/json %v; want %v, %v", fast, bad, want.fast, want.bad)
			}
		})
	}
}

// TestScanIndexedWritten: every operation this release writes, of every
// type and status, with and without its optional fields, is read by the
// scanner.
func TestScanIndexedWritten(t *testing.T) {
	vm, dev := "vm-1", int64(3)
	at := time.Date(2026, 3, 1, 10, 0, 0, 123456789, time.FixedZone("CET", 3600))
	done := at.Add(1500 * time.Millisecond)
	for _, typ := range commands.OpTypes {
		for _, st := range commands.OpStatuses {
			for _, full := range []bool{false, true} {
				op := commands.Operation{ID: "op-1", Type: typ, Status: st, VolumeID: "vol-1",
					Request: json.RawMessage(`{"volume_id":"vol-1"}`), CreatedAt: at, UpdatedAt: done}
				if full {
					op.VMID, op.CompletedAt = &vm, &done
					op.Response = &commands.OpResponse{VolumeID: "vol-1", DeviceID: &dev, Message: `said "no"` + "\n"}
					op.Details = map[string]any{"n": 1.5, "list": []any{"a", nil, true}}
					op.Error, op.Step, op.Attempts, op.ParentID = "<failed>", "x", 2, "op-0"
					op.RequestedBy = "api-token:alice@127.0.0.1"
				}
				raw, err := json.Marshal(op)
				if err != nil {
					t.Fatal(err)
				}
				if fast, bad := checkScan(t, raw); !fast || bad {
					t.Errorf("%s: read by the scanner %v, refused %v", raw, fast, bad)
				}
			}
		}
	}
}

// TestRunOf: the run runOf finds, eight bytes at a time, is the one a
// byte at a time finds, for the bytes on either side of every limit.
func TestRunOf(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	edges := []byte{0x00, 0x1f, 0x20, 0x21, '"', 0x23, '\\', 0x5b, 0x5d, 'a', 0x7f, 0x80, 0xc3, 0xff}
	for range 2000 {
		b := make([]byte, rng.IntN(40))
		for j := range b {
			if rng.IntN(4) == 0 {
				b[j] = edges[rng.IntN(len(edges))]
			} else {
				b[j] = 'a' + byte(rng.IntN(26))
			}
		}
		for _, set := range []*[256]bool{&scanPlain, &scanInString} {
			for i := range len(b) + 1 {
				want := i
				for want < len(b) && set[b[want]] {
					want++
				}
				if got := runOf(set, b, i); got != want {
					t.Fatalf("run of %q from %d: %d, want %d (plain %v)", b, i, got, want, set == &scanPlain)
				}
			}
		}
	}
}

// FuzzScanIndexed: whatever the scanner reads, it reads as encoding/json
// does, and encoding/json accepts it. The seeds are testdata/records.
func FuzzScanIndexed(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "records", "*.json"))
	for _, file := range files {
		raw, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(raw)
		f.Add(bytes.TrimSpace(raw))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		checkScan(t, raw)
	})
}

// BenchmarkScanIndexed reads the indexed fields of a record as this
// release writes it, with the scanner and with encoding/json.
func BenchmarkScanIndexed(b *testing.B) {
	raw, err := os.ReadFile(filepath.Join("testdata", "records", "current.json"))
	if err != nil {
		b.Fatal(err)
	}
	b.Run("scanner", func(b *testing.B) {
		b.SetBytes(int64(len(raw)))
		for b.Loop() {
			var o scannedOp
			if !scanIndexed(raw, &o) {
				b.Fatal("not read")
			}
		}
	})
	b.Run("encoding/json", func(b *testing.B) {
		b.SetBytes(int64(len(raw)))
		for b.Loop() {
			var o kvIndexed
			if err := json.Unmarshal(raw, &o); err != nil {
				b.Fatal(err)
			}
		}
	})
}
