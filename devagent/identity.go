package devagent

import (
	"path/filepath"
	"strings"

	"github.com/google/uuid"
	"github.com/volumed/volumed/commands"
)

// serialLen is how much of the dashless UUID CloudStack puts in the disk
// serial (diskUuidToSerial), and the most virtio-blk shows.
const serialLen = 20

// VolumeSerial is the disk serial CloudStack gives a volume: the UUID
// without dashes, lower case, first 20 characters.
func VolumeSerial(volumeUUID string) string {
	s := strings.ToLower(strings.ReplaceAll(volumeUUID, "-", ""))
	if len(s) > serialLen {
		s = s[:serialLen]
	}
	return s
}

// MatchesVolume reports whether the kernel identity of d is the volume's:
// a virtio serial equal to VolumeSerial, a SCSI WWID containing it, or a
// loop backing file whose base name contains the UUID (with dashes) or the
// serial. Case is ignored. It is false for a volumeUUID that is not a UUID
// and for a device without identity.
func MatchesVolume(d commands.Device, volumeUUID string) bool {
	id, err := uuid.Parse(volumeUUID)
	if err != nil {
		return false
	}
	full := id.String()
	serial := VolumeSerial(full)
	switch {
	case d.Serial != "" && strings.EqualFold(d.Serial, serial):
		return true
	case d.WWID != "" && strings.Contains(strings.ToLower(d.WWID), serial):
		return true
	case d.BackingFile != "":
		base := strings.ToLower(filepath.Base(d.BackingFile))
		return strings.Contains(base, full) || strings.Contains(base, serial)
	}
	return false
}

// HasIdentity reports whether d carries a kernel identity (serial, WWID or
// backing file) that MatchesVolume can use.
func HasIdentity(d commands.Device) bool {
	return d.Serial != "" || d.WWID != "" || d.BackingFile != ""
}
