package ipam

import (
	"context"
	"strings"
	"testing"
)

func TestStaticParses(t *testing.T) {
	for _, tc := range []struct {
		entries []string
		want    string
	}{
		{[]string{"10.0.0.5"}, "10.0.0.5"},
		{[]string{"10.0.1.0/29"}, "10.0.1.1 10.0.1.2 10.0.1.3 10.0.1.4 10.0.1.5 10.0.1.6"},
		{[]string{"10.0.1.0/30"}, "10.0.1.1 10.0.1.2"},
		{[]string{"10.0.1.6/31"}, "10.0.1.6 10.0.1.7"}, // point-to-point: both usable
		{[]string{"10.0.1.9/32"}, "10.0.1.9"},
		{[]string{" 10.0.0.9 ", "10.0.0.5", "10.0.0.4/30", "10.0.0.5"}, "10.0.0.5 10.0.0.6 10.0.0.9"}, // sorted, merged
		{[]string{"255.255.255.252/30"}, "255.255.255.253 255.255.255.254"},
	} {
		s, err := NewStatic(tc.entries)
		if err != nil {
			t.Errorf("NewStatic(%q): %v", tc.entries, err)
			continue
		}
		as, err := s.Addresses(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, a := range as {
			got = append(got, a.String())
		}
		if g := strings.Join(got, " "); g != tc.want {
			t.Errorf("NewStatic(%q) = %s, want %s", tc.entries, g, tc.want)
		}
	}
}

func TestStaticAddressesIsACopy(t *testing.T) {
	s, err := NewStatic([]string{"10.0.0.1", "10.0.0.2"})
	if err != nil {
		t.Fatal(err)
	}
	first, _ := s.Addresses(context.Background())
	first[0] = first[1]
	second, _ := s.Addresses(context.Background())
	if second[0].String() != "10.0.0.1" {
		t.Errorf("changing one answer changed the next: %v", second)
	}
	if s.Name() != "static" {
		t.Errorf("Name = %q", s.Name())
	}
}

func TestStaticRejectsJunk(t *testing.T) {
	for _, tc := range []struct {
		entry, why string
	}{
		{"", "empty"},
		{"banana", "not an IPv4 address"},
		{"10.0.0", "not an IPv4 address"},
		{"10.0.0.256", "not an IPv4 address"},
		{"10.0.0.0/33", "not an IPv4 address or CIDR"},
		{"10.0.0.0/", "not an IPv4 address or CIDR"},
		{"10.0.1.5/28", "did you mean 10.0.1.0/28"},
		{"10.0.0.0/8", "more than the 65536 allowed"},
		{"fd00::1", "IPv6"},
		{"169.254.1.1", "not a unicast address"},
		{"127.0.0.0/30", "not a unicast address"},
		{"224.0.0.8/29", "not a unicast address"},
		{"0.0.0.0", "not a unicast address"},
		{"fd00::/120", "IPv6"},
	} {
		_, err := NewStatic([]string{"10.0.0.1", tc.entry})
		if err == nil {
			t.Errorf("NewStatic accepted %q", tc.entry)
			continue
		}
		if !strings.Contains(err.Error(), `"`+tc.entry+`"`) || !strings.Contains(err.Error(), tc.why) {
			t.Errorf("NewStatic(%q): error %q does not name the entry and say %q", tc.entry, err, tc.why)
		}
	}
	if _, err := NewStatic(nil); err == nil {
		t.Error("NewStatic accepted no entries")
	}
	if _, err := NewStatic([]string{"10.0.0.0/16", "10.1.0.0/24"}); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Errorf("NewStatic of more than %d addresses in total: err = %v", MaxStaticAddresses, err)
	}
}
