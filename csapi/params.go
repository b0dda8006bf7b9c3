package csapi

import (
	"fmt"
	"strings"
)

// CodeParamError is CloudStack's errorcode of a parameter error.
const CodeParamError = 431

// InvalidParameterText is CloudStack's errortext (errorcode 431,
// cserrorcode 9999) when parameter param of command names no entity, as
// its API layer answers before the command runs.
func InvalidParameterText(command, param, value string) string {
	return fmt.Sprintf("Unable to execute API command %s due to invalid value. Invalid parameter %s value=%s due to "+
		"incorrect long value format, or entity does not exist or due to incorrect parameter annotation for the field "+
		"in api cmd class.", strings.ToLower(command), param, value)
}

// ShrinkText is CloudStack's errortext (errorcode 431) when resizeVolume
// would shrink a volume from `from` to `to` bytes without shrinkok.
func ShrinkText(from, to int64) string {
	return fmt.Sprintf("Going from existing size of %d to size of %d would shrink the volume."+
		"Need to sign off by supplying the shrinkok parameter with value of true.", from, to)
}
