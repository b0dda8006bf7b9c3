package hostwork

import (
	"slices"
	"testing"

	"github.com/volumed/volumed/commands"
)

// TestExportChangeApply: the export write a requester made is applied over
// a host's reading of the records that may not show it yet.
func TestExportChangeApply(t *testing.T) {
	here, there := "vm-here", "vm-there"
	old := []commands.Export{{VolumeID: "a", VMID: here, ExportName: "vola"}, {VolumeID: "b", VMID: here, ExportName: "volb"}}
	for _, tc := range []struct {
		name   string
		change *exportChange
		want   []string
	}{
		{"none", nil, []string{"a", "b"}},
		{"removed, still read", &exportChange{Removed: "a"}, []string{"b"}},
		{"put, not read yet", &exportChange{Put: &commands.Export{VolumeID: "c", VMID: here}}, []string{"a", "b", "c"}},
		{"put over an old reading", &exportChange{Put: &commands.Export{VolumeID: "b", VMID: here, ReadOnly: true}}, []string{"a", "b"}},
		{"put for another VM", &exportChange{Put: &commands.Export{VolumeID: "b", VMID: there}}, []string{"a"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.change.apply(slices.Clone(old), here)
			var ids []string
			for _, e := range got {
				ids = append(ids, e.VolumeID)
			}
			if !slices.Equal(ids, tc.want) {
				t.Fatalf("records %v, want %v", ids, tc.want)
			}
			if tc.name == "put over an old reading" && !got[1].ReadOnly {
				t.Fatalf("the old reading of b won over the write: %+v", got[1])
			}
		})
	}
}
