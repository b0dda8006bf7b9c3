package commands

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"
)

// MinVolumeSize is the smallest volume volumed creates: 1 GiB.
const MinVolumeSize int64 = 1 << 30

// MaxVolumeSize is the largest volume volumed creates: 64 TiB. A larger
// size is refused before it is converted to GiB.
const MaxVolumeSize int64 = 64 << 40

// MaxListLimit caps the limit (page size) a list may ask for.
const MaxListLimit = 1000

// DefaultListLimit is the page size of a list that asks for none.
const DefaultListLimit = 100

// MaxBodyBytes bounds every request body, on REST and on NATS.
const MaxBodyBytes = 64 << 10

// Root attach constants: attach-root attaches as CloudStack device 0.
const (
	AttachAsRoot = "root"
	RootDeviceID = int64(0)
)

// CreateRequest is the body of POST /volumes and volumes.cmd.create.
type CreateRequest struct {
	// Name is the volume's name: 1 to 255 bytes, no control characters.
	Name string `json:"name"`
	// Size is in bytes, MinVolumeSize to MaxVolumeSize; rounded up to
	// whole GiB.
	Size int64 `json:"size"`
	// DiskOfferingID is the CloudStack disk offering, a UUID.
	DiskOfferingID string `json:"disk_offering_id"`
	// ZoneID is the CloudStack zone to create the volume in, a UUID.
	ZoneID string `json:"zone_id"`
	// Metadata becomes the volume's CloudStack tags: each value a string,
	// or, recorded by an earlier volumed, any JSON (its text is the tag).
	Metadata map[string]any `json:"metadata,omitempty"`
	// SnapshotID creates the volume from this snapshot, with its data;
	// Size, DiskOfferingID and ZoneID are then optional.
	SnapshotID string `json:"snapshot_id,omitempty"`
}

// SizeGiB is the size in whole GiB, rounded up, as CloudStack takes it.
func (r CreateRequest) SizeGiB() int64 {
	gib := r.Size / MinVolumeSize
	if r.Size%MinVolumeSize != 0 {
		gib++
	}
	return gib
}

// AttachRequest is the recorded request of an attach or attach-root.
type AttachRequest struct {
	// VolumeID is the volume to attach, a bare lower-case UUID.
	VolumeID string `json:"volume_id"`
	// VMID is the VM to attach it to, a bare lower-case UUID.
	VMID string `json:"vm_id"`
	// DeviceID is the device id to ask for: 0 for attach-root; for a
	// workflow's attach back to where a volume was, the device it had
	// there (taken as a wish: another when it is taken); nil otherwise.
	DeviceID *int64 `json:"device_id,omitempty"`
	// AttachAs is AttachAsRoot for an attach-root, "" otherwise.
	AttachAs string `json:"attach_as,omitempty"`
}

// Root reports whether this attach is an attach-root.
func (r AttachRequest) Root() bool { return r.AttachAs == AttachAsRoot }

// VolumeRequest is the request of detach and delete.
type VolumeRequest struct {
	// VolumeID is the volume to detach or delete, a UUID ("vol-" prefix allowed).
	VolumeID string `json:"volume_id"`
	// Force detaches or deletes a volume whose device is in use (mounted,
	// held, open, or its NBD export with clients): the export's clients
	// are cut. Detach and delete only (an unexport always cuts them).
	Force bool `json:"force,omitempty"`
}

var uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// NormalizeID validates a CloudStack UUID, given bare or with the prefix
// the API reference's examples use ("vol-", "vm-"), and returns it bare and
// lower-case. field names the field in the error.
func NormalizeID(field, prefix, id string) (string, error) {
	if id == "" {
		return "", Invalid(field, "%s is required", field)
	}
	bare := strings.ToLower(strings.TrimPrefix(strings.ToLower(id), prefix))
	if !uuidRE.MatchString(bare) {
		return "", Invalid(field, "%s must be a UUID, got %q", field, Shown(id, 80)).WithDetail("provided_value", Shown(id, 80))
	}
	return bare, nil
}

// NormalizeVolumeID validates a volume id ("vol-" prefix allowed).
func NormalizeVolumeID(id string) (string, error) { return NormalizeID("volume_id", "vol-", id) }

// NormalizeVMID validates a VM id ("vm-" prefix allowed).
func NormalizeVMID(id string) (string, error) { return NormalizeID("vm_id", "vm-", id) }

// NormalizeOperationID validates an operation id: "op-" and a UUID.
func NormalizeOperationID(id string) (string, error) {
	bare, err := NormalizeID("operation_id", "op-", id)
	if err != nil {
		return "", err
	}
	return "op-" + bare, nil
}

// DecodeCreate parses and validates a create request.
func DecodeCreate(data []byte) (CreateRequest, error) {
	var r CreateRequest
	if err := decodeStrict(data, &r); err != nil {
		return r, err
	}
	name := strings.TrimSpace(r.Name)
	switch {
	case name == "":
		return r, Invalid("name", "name is required")
	case len(r.Name) > 255:
		return r, Invalid("name", "name must be at most 255 bytes")
	case strings.IndexFunc(r.Name, unicode.IsControl) >= 0:
		return r, Invalid("name", "name must not contain control characters")
	}
	var err error
	if r.SnapshotID != "" {
		return decodeFromSnapshot(r)
	}
	if r.Size < MinVolumeSize {
		return r, Invalid("size", "Invalid volume size: must be at least 1GB").
			WithDetail("provided_value", r.Size).WithDetail("minimum_value", MinVolumeSize)
	}
	if r.Size > MaxVolumeSize {
		return r, Invalid("size", "Invalid volume size: must be at most 64 TiB (%d bytes)", MaxVolumeSize).
			WithDetail("provided_value", r.Size).WithDetail("maximum_value", MaxVolumeSize)
	}
	if r.DiskOfferingID, err = NormalizeID("disk_offering_id", "", r.DiskOfferingID); err != nil {
		return r, err
	}
	if r.ZoneID, err = NormalizeID("zone_id", "", r.ZoneID); err != nil {
		return r, err
	}
	return r, checkMetadata(r.Metadata)
}

// DecodeAttach parses and validates an attach request ({"volume_id",
// "vm_id"}); root makes it an attach-root (device 0).
func DecodeAttach(data []byte, root bool) (AttachRequest, error) {
	var in struct {
		VolumeID string `json:"volume_id"`
		VMID     string `json:"vm_id"`
	}
	if err := decodeStrict(data, &in); err != nil {
		return AttachRequest{}, err
	}
	vol, err := NormalizeVolumeID(in.VolumeID)
	if err != nil {
		return AttachRequest{}, err
	}
	vm, err := NormalizeVMID(in.VMID)
	if err != nil {
		return AttachRequest{}, err
	}
	r := AttachRequest{VolumeID: vol, VMID: vm}
	if root {
		dev := RootDeviceID
		r.DeviceID, r.AttachAs = &dev, AttachAsRoot
	}
	return r, nil
}

// DecodeVolume parses and validates a detach or delete request.
func DecodeVolume(data []byte) (VolumeRequest, error) {
	var r VolumeRequest
	if err := decodeStrict(data, &r); err != nil {
		return r, err
	}
	var err error
	r.VolumeID, err = NormalizeVolumeID(r.VolumeID)
	return r, err
}

// DecodeForceSync validates a force-sync request, which takes nothing: an
// empty body, or a JSON object without fields.
func DecodeForceSync(data []byte) error {
	var none struct{}
	return decodeStrict(data, &none)
}

// decodeStrict decodes one JSON object, rejecting unknown fields, trailing
// data, bytes that are not UTF-8 (which encoding/json would silently turn
// into U+FFFD) and oversized bodies with INVALID_REQUEST errors.
func decodeStrict(data []byte, v any) error {
	if len(data) > MaxBodyBytes {
		return Invalid("", "request body is larger than %d bytes", MaxBodyBytes)
	}
	if !utf8.Valid(data) {
		return Invalid("", "malformed JSON: the request body is not valid UTF-8")
	}
	if len(bytes.TrimSpace(data)) == 0 {
		data = []byte("{}")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return decodeError(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return Invalid("", "request body must hold exactly one JSON object")
	}
	return exactNames(data, v)
}

// exactNames refuses a key of the body's object that names a field of
// *v only when case is ignored: encoding/json matches names without case,
// so "VOLUME_ID" would be taken as volume_id, and a body's id that
// differs from the path's would go unnoticed.
func exactNames(data []byte, v any) error {
	var fields map[string]json.RawMessage
	if json.Unmarshal(data, &fields) != nil || len(fields) == 0 {
		return nil // null: nothing was set
	}
	t := reflect.TypeOf(v).Elem()
	names := make(map[string]bool, t.NumField())
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		names[name] = true
	}
	for _, k := range slices.Sorted(maps.Keys(fields)) {
		if !names[k] {
			return unknownField(k)
		}
	}
	return nil
}

func decodeError(err error) error {
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	switch {
	case errors.As(err, &typeErr):
		if typeErr.Field == "" {
			return Invalid("", "request body must be a JSON object")
		}
		return Invalid(typeErr.Field, "%s must be %s, got %s", typeErr.Field, jsonKind(typeErr.Type.Kind().String()), typeErr.Value)
	case errors.As(err, &syntaxErr):
		return Invalid("", "malformed JSON at byte %d: %v", syntaxErr.Offset, err)
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return unknownField(strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`))
	case errors.Is(err, io.ErrUnexpectedEOF):
		return Invalid("", "malformed JSON: unexpected end of input")
	}
	return Invalid("", "malformed JSON: %v", err)
}

func jsonKind(goKind string) string {
	switch goKind {
	case "int64", "int", "int32":
		return "an integer"
	case "string":
		return "a string"
	case "bool":
		return "a boolean"
	case "map", "struct":
		return "an object"
	case "slice", "array":
		return "an array"
	}
	return fmt.Sprintf("a %s", goKind)
}

// Shown cuts a user's input to at most n bytes (never inside a UTF-8
// character) for an error message, marking the cut with "…".
func Shown(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}

// unknownField refuses a body's field name, cut to 40 bytes as every
// other value an error echoes.
func unknownField(name string) error {
	name = Shown(name, 40)
	return Invalid(name, "unknown field %q", name)
}
