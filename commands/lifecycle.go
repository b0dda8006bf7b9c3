package commands

import (
	"encoding/json"
	"strings"
	"time"
	"unicode"
)

// Tag limits: CloudStack stores keys and values of up to 255 characters;
// MaxTags bounds one volume's set.
const (
	MaxTagLength = 255
	MaxTags      = 64
)

// Snapshot is a volume snapshot, as GET /snapshots/{id} and GET
// /volumes/{id}/snapshots show it.
type Snapshot struct {
	// ID is the snapshot's CloudStack UUID.
	ID string `json:"id"`
	// VolumeID is the volume the snapshot was taken of.
	VolumeID string `json:"volume_id"`
	// Name is the snapshot's name.
	Name string `json:"name"`
	// State is CloudStack's snapshot state: "Creating", "BackedUp" (usable)
	// or "Error".
	State string `json:"state"`
	// Size is the volume's size at the snapshot, in bytes.
	Size int64 `json:"size"`
	// CreatedAt is when the snapshot was taken (UTC); null if CloudStack
	// did not say.
	CreatedAt *time.Time `json:"created_at"`
}

// VolumeFilter selects the volumes of GET /volumes.
type VolumeFilter struct {
	// Tags selects the volumes that have every one of these tags.
	Tags map[string]string
	// VMID selects the volumes attached to this VM.
	VMID string
	// Name selects the volumes of this name.
	Name string
	// Limit is the page size.
	Limit int
	// Cursor is the id of the last volume of the page before; "" for the
	// first page.
	Cursor string
}

// SnapshotRequest is the request of POST /volumes/{id}/snapshots and
// volumes.cmd.snapshot.
type SnapshotRequest struct {
	// VolumeID is the volume to snapshot.
	VolumeID string `json:"volume_id"`
	// Name is the snapshot's name; "" names it after the operation
	// (SnapshotName).
	Name string `json:"name,omitempty"`
	// Quiesce asks CloudStack for a snapshot with the guest's file systems
	// quiesced (createSnapshot quiescevm=true); CloudStack's default
	// snapshot strategy refuses it, and the operation then fails with
	// CloudStack's code and text.
	Quiesce bool `json:"quiesce"`
}

// SnapshotName is the name of the snapshot an operation takes: the
// request's, or one derived from the operation's id, so that a lost
// answer is found again by listing the volume's snapshots for it.
func SnapshotName(opID, requested string) string {
	if requested != "" {
		return requested
	}
	return "volumed-" + strings.TrimPrefix(opID, "op-")
}

// SnapshotIDRequest is the request of DELETE /snapshots/{id} and
// volumes.cmd.delete_snapshot.
type SnapshotIDRequest struct {
	// SnapshotID is the snapshot, a UUID.
	SnapshotID string `json:"snapshot_id"`
}

// RevertRequest is the request of POST /volumes/{id}/revert and
// volumes.cmd.revert.
type RevertRequest struct {
	// VolumeID is the volume to revert.
	VolumeID string `json:"volume_id"`
	// SnapshotID is the snapshot of that volume to revert it to.
	SnapshotID string `json:"snapshot_id"`
}

// ResizeRequest is the request of POST /volumes/{id}/resize and
// volumes.cmd.resize.
type ResizeRequest struct {
	// VolumeID is the volume to resize.
	VolumeID string `json:"volume_id"`
	// Size is the new size in bytes, MinVolumeSize to MaxVolumeSize;
	// rounded up to whole GiB.
	Size int64 `json:"size"`
	// ShrinkOK allows a size below the volume's.
	ShrinkOK bool `json:"shrink_ok"`
}

// SizeGiB is the size in whole GiB, rounded up, as CloudStack takes it.
func (r ResizeRequest) SizeGiB() int64 { return gib(r.Size) }

// TagsRequest is the request of PUT /volumes/{id}/tags and
// volumes.cmd.tags.
type TagsRequest struct {
	// VolumeID is the volume whose tags are set.
	VolumeID string `json:"volume_id"`
	// Tags are the volume's tags once done, exactly.
	Tags map[string]string `json:"tags"`
}

// gib is a size in bytes in whole GiB, rounded up.
func gib(size int64) int64 {
	n := size / MinVolumeSize
	if size%MinVolumeSize != 0 {
		n++
	}
	return n
}

// NormalizeSnapshotID validates a snapshot id ("snap-" prefix allowed).
func NormalizeSnapshotID(id string) (string, error) { return NormalizeID("snapshot_id", "snap-", id) }

// DecodeSnapshot parses and validates a snapshot request.
func DecodeSnapshot(data []byte) (SnapshotRequest, error) {
	var r SnapshotRequest
	if err := decodeStrict(data, &r); err != nil {
		return r, err
	}
	var err error
	if r.VolumeID, err = NormalizeVolumeID(r.VolumeID); err != nil {
		return r, err
	}
	if r.Name != "" {
		if err := checkName("name", r.Name); err != nil {
			return r, err
		}
	}
	return r, nil
}

// DecodeSnapshotID parses and validates a delete_snapshot request.
func DecodeSnapshotID(data []byte) (SnapshotIDRequest, error) {
	var r SnapshotIDRequest
	if err := decodeStrict(data, &r); err != nil {
		return r, err
	}
	var err error
	r.SnapshotID, err = NormalizeSnapshotID(r.SnapshotID)
	return r, err
}

// DecodeRevert parses and validates a revert request.
func DecodeRevert(data []byte) (RevertRequest, error) {
	var r RevertRequest
	if err := decodeStrict(data, &r); err != nil {
		return r, err
	}
	var err error
	if r.VolumeID, err = NormalizeVolumeID(r.VolumeID); err != nil {
		return r, err
	}
	r.SnapshotID, err = NormalizeSnapshotID(r.SnapshotID)
	return r, err
}

// DecodeResize parses and validates a resize request.
func DecodeResize(data []byte) (ResizeRequest, error) {
	var in struct {
		VolumeID string `json:"volume_id"`
		Size     *int64 `json:"size"`
		ShrinkOK bool   `json:"shrink_ok"`
	}
	if err := decodeStrict(data, &in); err != nil {
		return ResizeRequest{}, err
	}
	vol, err := NormalizeVolumeID(in.VolumeID)
	if err != nil {
		return ResizeRequest{}, err
	}
	if in.Size == nil {
		return ResizeRequest{}, Invalid("size", "size is required")
	}
	if err := checkSize(*in.Size); err != nil {
		return ResizeRequest{}, err
	}
	return ResizeRequest{VolumeID: vol, Size: *in.Size, ShrinkOK: in.ShrinkOK}, nil
}

// DecodeTags parses and validates a tags request.
func DecodeTags(data []byte) (TagsRequest, error) {
	var in struct {
		VolumeID string          `json:"volume_id"`
		Tags     *map[string]any `json:"tags"`
	}
	if err := decodeStrict(data, &in); err != nil {
		return TagsRequest{}, err
	}
	vol, err := NormalizeVolumeID(in.VolumeID)
	if err != nil {
		return TagsRequest{}, err
	}
	if in.Tags == nil {
		return TagsRequest{}, Invalid("tags", "tags is required (an object; {} removes every tag)")
	}
	tags, err := stringTags("tags", *in.Tags)
	if err != nil {
		return TagsRequest{}, err
	}
	if err := checkTags("tags", tags); err != nil {
		return TagsRequest{}, err
	}
	return TagsRequest{VolumeID: vol, Tags: tags}, nil
}

// MetadataTags are the CloudStack tags a create's metadata becomes: a
// string value as it is, any other (recorded by an earlier volumed, which
// took any JSON) as its JSON text. An entry CloudStack could not take as a
// tag (an empty or blank key or value, over 255 bytes, control
// characters), which only an earlier volumed accepted, is left out.
func MetadataTags(metadata map[string]any) map[string]string {
	if len(metadata) == 0 {
		return nil
	}
	tags := make(map[string]string, len(metadata))
	for k, v := range metadata {
		s, ok := v.(string)
		if !ok {
			raw, _ := json.Marshal(v)
			s = string(raw)
		}
		if checkName("metadata", k) == nil && checkName("metadata", s) == nil {
			tags[k] = s
		}
	}
	return tags
}

// decodeFromSnapshot validates a create from a snapshot: size, disk
// offering and zone are optional, and checked when given.
func decodeFromSnapshot(r CreateRequest) (CreateRequest, error) {
	var err error
	if r.SnapshotID, err = NormalizeSnapshotID(r.SnapshotID); err != nil {
		return r, err
	}
	if r.Size != 0 {
		if err := checkSize(r.Size); err != nil {
			return r, err
		}
	}
	if r.DiskOfferingID != "" {
		if r.DiskOfferingID, err = NormalizeID("disk_offering_id", "", r.DiskOfferingID); err != nil {
			return r, err
		}
	}
	if r.ZoneID != "" {
		if r.ZoneID, err = NormalizeID("zone_id", "", r.ZoneID); err != nil {
			return r, err
		}
	}
	return r, checkMetadata(r.Metadata)
}

// checkSize validates a volume size in bytes.
func checkSize(size int64) error {
	if size < MinVolumeSize {
		return Invalid("size", "Invalid volume size: must be at least 1GB").
			WithDetail("provided_value", size).WithDetail("minimum_value", MinVolumeSize)
	}
	if size > MaxVolumeSize {
		return Invalid("size", "Invalid volume size: must be at most 64 TiB (%d bytes)", MaxVolumeSize).
			WithDetail("provided_value", size).WithDetail("maximum_value", MaxVolumeSize)
	}
	return nil
}

// checkName validates a name: at most 255 bytes, not blank, no control
// characters.
func checkName(field, name string) error {
	switch {
	case strings.TrimSpace(name) == "":
		return Invalid(field, "%s must not be blank", field)
	case len(name) > MaxTagLength:
		return Invalid(field, "%s must be at most 255 bytes", field)
	case strings.IndexFunc(name, unicode.IsControl) >= 0:
		return Invalid(field, "%s must not contain control characters", field)
	}
	return nil
}

// checkMetadata validates a create's metadata as tags: string values.
func checkMetadata(metadata map[string]any) error {
	tags, err := stringTags("metadata", metadata)
	if err != nil {
		return err
	}
	return checkTags("metadata", tags)
}

// stringTags is m (field of a request) as tags: each value must be a
// string, and the error names the key whose value is not.
func stringTags(field string, m map[string]any) (map[string]string, error) {
	tags := make(map[string]string, len(m))
	for k, v := range m {
		s, ok := v.(string)
		if !ok {
			return nil, Invalid(field, "%s.%s must be a string: %s become the volume's CloudStack tags", field, Shown(k, 80), field)
		}
		tags[k] = s
	}
	return tags, nil
}

// checkTags validates tags as CloudStack takes them: non-empty keys and
// values of at most MaxTagLength characters, at most MaxTags of them, and
// no two keys that differ only in case (CloudStack compares keys without
// case).
func checkTags(field string, tags map[string]string) error {
	if len(tags) > MaxTags {
		return Invalid(field, "%s holds %d tags; at most %d", field, len(tags), MaxTags)
	}
	seen := map[string]string{}
	for k, v := range tags {
		shown := Shown(k, 80)
		if err := checkName(field, k); err != nil {
			return Invalid(field, "%s: a key must be 1 to 255 bytes without control characters, got %q", field, shown)
		}
		if err := checkName(field, v); err != nil {
			return Invalid(field, "%s.%s: a value must be 1 to 255 bytes without control characters (CloudStack refuses empty values)", field, shown)
		}
		if other, dup := seen[strings.ToLower(k)]; dup {
			return Invalid(field, "%s: keys %q and %q differ only in case; CloudStack compares keys without case", field, Shown(other, 80), shown)
		}
		seen[strings.ToLower(k)] = k
	}
	return nil
}
