package state

import (
	"cmp"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/volumed/volumed/commands"
)

// opScore is the sort key of an operation's CreatedAt: microseconds since
// the epoch, exact in a float64 (a Redis score) until the year 2255. Both
// backends order by it, then by id, both descending.
func opScore(t time.Time) int64 { return t.UnixMicro() }

// opRef locates an operation in an ordered index.
type opRef struct {
	score int64
	id    string
}

// compareRefs orders refs oldest first; listings walk it backwards.
func compareRefs(a, b opRef) int {
	if c := cmp.Compare(a.score, b.score); c != 0 {
		return c
	}
	return strings.Compare(a.id, b.id)
}

// sortMappings orders mappings by creation, then volume id.
func sortMappings(ms []commands.Mapping) {
	slices.SortFunc(ms, func(a, b commands.Mapping) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.VolumeID, b.VolumeID)
	})
}

// sortExports orders exports by volume id.
func sortExports(es []commands.Export) {
	slices.SortFunc(es, func(a, b commands.Export) int { return strings.Compare(a.VolumeID, b.VolumeID) })
}

// checkMapping refuses a mapping record a read would call corrupt: one
// without a volume id or a VM id.
func checkMapping(m commands.Mapping) error {
	if why := checkRecord("", &m); why != "" {
		return fmt.Errorf("state: mapping %q refused: %s", m.VolumeID, why)
	}
	return nil
}

// checkExport refuses an export record a read would call corrupt: one
// without a volume id or a VM id.
func checkExport(e commands.Export) error {
	if why := checkRecord("", &e); why != "" {
		return fmt.Errorf("state: export %q refused: %s", e.VolumeID, why)
	}
	return nil
}

// newStats returns Stats with every type and status present at zero.
func newStats() Stats {
	s := Stats{ByType: make(map[commands.OpType]int64), ByStatus: make(map[commands.OpStatus]int64)}
	for _, t := range commands.OpTypes {
		s.ByType[t] = 0
	}
	for _, st := range commands.OpStatuses {
		s.ByStatus[st] = 0
	}
	return s
}

// clone returns a copy of s that changes to s leave as it is.
func (s Stats) clone() Stats {
	s.ByType, s.ByStatus = maps.Clone(s.ByType), maps.Clone(s.ByStatus)
	return s
}

// checkOp rejects an operation no index could place, one a read would
// call corrupt: without an id, a type or a status.
func checkOp(op *commands.Operation) error {
	if why := checkRecord("", op); why != "" {
		return fmt.Errorf("state: operation %q refused: %s", op.ID, why)
	}
	return nil
}

// decode unmarshals the record stored at key into v and checks it is a
// record of its kind: the fields every writer sets are present, and its
// id is id, that of its key ("" checks no id). A record that is not one
// is ErrCorrupt naming the key, never a zero value taken as real.
func decode[T any](key, id string, data []byte, v *T) error {
	if err := json.Unmarshal(data, v); err != nil {
		return corrupt(key, err.Error())
	}
	if why := checkRecord(id, v); why != "" {
		return corrupt(key, why)
	}
	return nil
}

// corrupt is the ErrCorrupt of the record at key.
func corrupt(key, why string) error {
	return fmt.Errorf("state: record %s: %w: %s", key, ErrCorrupt, why)
}

// checkRecord says what a decoded record lacks, "" when nothing: a
// mapping or export a volume and a VM, an operation an id, a type and a
// status; and the id of its key.
func checkRecord(id string, v any) string {
	var got string
	switch r := v.(type) {
	case *commands.Mapping:
		if r.VolumeID == "" || r.VMID == "" {
			return "a mapping needs volume_id and vm_id"
		}
		got = r.VolumeID
	case *commands.Export:
		if r.VolumeID == "" || r.VMID == "" {
			return "an export needs volume_id and vm_id"
		}
		got = r.VolumeID
	case *commands.Operation:
		if r.ID == "" || r.Type == "" || r.Status == "" {
			return "an operation needs id, type and status"
		}
		got = r.ID
	case *kvIndexed:
		if r.Type == "" || r.Status == "" {
			return "an operation needs type and status"
		}
		return ""
	default:
		return ""
	}
	if id != "" && got != id {
		return fmt.Sprintf("the record of %q", got)
	}
	return ""
}

// filterIndexes names the indexes (as "type:attach", "vm:<id>", …) that f
// selects by, or "all" when it selects by nothing.
func filterIndexes(f Filter) []string {
	return indexNames(string(f.Type), string(f.Status), f.VolumeID, f.VMID, f.RequestedBy, false)
}

// indexDims names the dimensions of the indexes, in the order of
// indexNames' arguments.
var indexDims = [...]string{"type", "status", "volume", "vm", "by"}

// indexNames names the indexes of the given field values ("" for none):
// type:, status:, volume:, vm: and by: (requested by).
func indexNames(typ, status, volume, vm, by string, withAll bool) []string {
	var names []string
	for d, value := range [...]string{typ, status, volume, vm, by} {
		if value != "" {
			names = append(names, indexDims[d]+":"+value)
		}
	}
	if withAll || len(names) == 0 {
		names = append(names, "all")
	}
	return names
}

// formatCursor is the cursor after ref in the newest-first order: its
// sort key, opaque to callers.
func formatCursor(ref opRef) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(ref.score, 10) + ":" + ref.id))
}

// parseCursor decodes a cursor; nil for "". A cursor that is not one is a
// bad request.
func parseCursor(s string) (*opRef, error) {
	if s == "" {
		return nil, nil
	}
	raw, err := base64.RawURLEncoding.DecodeString(s)
	score, id, ok := strings.Cut(string(raw), ":")
	n, perr := strconv.ParseInt(score, 10, 64)
	if err != nil || !ok || perr != nil || id == "" {
		return nil, commands.Invalid("cursor", "cursor %q is not a position this server hands out", commands.Shown(s, 64))
	}
	return &opRef{score: n, id: id}, nil
}

// completedAt is when a terminal operation ended: CompletedAt, or its last
// update when it has none.
func completedAt(op *commands.Operation) time.Time {
	if op.CompletedAt != nil {
		return *op.CompletedAt
	}
	return op.UpdatedAt
}

// checkMove refuses an update of old to op that neither CanMove nor
// CanAnnotate allows. Both stores call it on the record read at op's
// revision, and write only if the record is still at that revision.
func checkMove(old, op *commands.Operation) error {
	switch {
	case CanMove(old.Status, op.Status), CanAnnotate(*old, *op):
		return nil
	case old.Status == op.Status:
		return fmt.Errorf("state: operation %s is %s: only details of a failed operation may change: %w", op.ID, old.Status, ErrTransition)
	}
	return fmt.Errorf("state: operation %s from %s to %s: %w", op.ID, old.Status, op.Status, ErrTransition)
}

// minLeaseTTL is the shortest lease: JetStream's per-message TTLs count
// in seconds.
const minLeaseTTL = time.Second

// checkLease refuses a lease without a name or holder, or shorter than
// minLeaseTTL.
func checkLease(name, holder string, ttl time.Duration) error {
	if name == "" || holder == "" || ttl < minLeaseTTL {
		return fmt.Errorf("state: lease %q for %q needs a name, a holder and a ttl of at least %v (got %v)", name, holder, minLeaseTTL, ttl)
	}
	return nil
}

// matches reports whether op has every field f sets.
func matches(op *commands.Operation, f Filter) bool {
	return op != nil && (f.Type == "" || op.Type == f.Type) && (f.Status == "" || op.Status == f.Status) &&
		(f.VolumeID == "" || op.VolumeID == f.VolumeID) && (f.VMID == "" || op.VM() == f.VMID) &&
		(f.RequestedBy == "" || op.RequestedBy == f.RequestedBy)
}
