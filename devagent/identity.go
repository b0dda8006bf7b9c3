package devagent

import (
	"path/filepath"
	"regexp"
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
// a virtio or NVMe controller serial equal to VolumeSerial, a SCSI or
// NVMe WWID or an NVMe NGUID containing it, an NVMe EUI-64 equal to its
// first 16 hex digits (dashes and spaces ignored), or a loop backing file
// whose base name contains the UUID (with dashes) or the serial. Case is
// ignored. It is false for a volumeUUID that is not a UUID and for a
// device without identity.
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
	case d.WWID != "" && strings.Contains(hexOnly(d.WWID), serial):
		return true
	case d.NGUID != "" && strings.Contains(hexOnly(d.NGUID), serial):
		return true
	case d.EUI != "" && hexOnly(d.EUI) == serial[:euiLen]:
		return true
	case d.BackingFile != "":
		base := strings.ToLower(filepath.Base(d.BackingFile))
		return strings.Contains(base, full) || strings.Contains(base, serial)
	}
	return false
}

// carriesName reports whether the kernel identity of d is that of a
// volume whose persistent name is name: its serial or EUI-64 begins with
// the name's 8 hex digits, or its WWID, NGUID or loop backing file's base
// name contains them. It holds wherever MatchesVolume holds for a volume
// of that name; a disk without identity carries no name.
func carriesName(d commands.Device, name string) bool {
	if !IsPersistentName(name) {
		return false
	}
	h := strings.TrimPrefix(name, "vol")
	switch {
	case d.Serial != "" && strings.HasPrefix(strings.ToLower(d.Serial), h):
		return true
	case d.WWID != "" && strings.Contains(hexOnly(d.WWID), h):
		return true
	case d.NGUID != "" && strings.Contains(hexOnly(d.NGUID), h):
		return true
	case d.EUI != "" && strings.HasPrefix(hexOnly(d.EUI), h):
		return true
	case d.BackingFile != "":
		return strings.Contains(strings.ToLower(filepath.Base(d.BackingFile)), h)
	}
	return false
}

// euiLen is the length of an EUI-64 in hex digits.
const euiLen = 16

// hexOnly lower-cases s and drops its dashes and spaces: WWIDs and NGUIDs
// are written with or without dashes, and the kernel shows an EUI-64 as
// bytes apart ("7c 9e 66 79 74 25 40 de", nvme's eui attribute).
func hexOnly(s string) string { return strings.ToLower(hexSeparators.Replace(s)) }

// hexSeparators drops what hexOnly drops.
var hexSeparators = strings.NewReplacer("-", "", " ", "")

// uuidInName finds a UUID in a backing file's name.
var uuidInName = regexp.MustCompile(`[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`)

// HasIdentity reports whether d carries a kernel identity that can name a
// volume: a serial, a WWID, an NGUID or EUI-64, or a loop backing file
// whose name holds a UUID.
// A loop device on an anonymous file names no volume: such devices are
// told apart by size and time only.
func HasIdentity(d commands.Device) bool {
	return d.Serial != "" || d.WWID != "" || d.NGUID != "" || d.EUI != "" || uuidInName.MatchString(strings.ToLower(filepath.Base(d.BackingFile)))
}
