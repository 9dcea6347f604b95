"""Orthanc Python plugin (Debian `orthanc-python`): a "Similar cases" button on Orthanc Explorer's study page.

The button opens the node's similar-cases page for the study shown, in a new tab. Orthanc's configuration:

    "Plugins": ["/usr/share/orthanc/plugins/libOrthancPython.so"],
    "PythonScript": "/path/to/orthanc_similar_cases.py",
    "MmdlSimilar": {"PageUrl": "http://127.0.0.1:8080"}     // the node's [web] address

Runs inside Orthanc only (the `orthanc` module is Orthanc's); it adds JavaScript to Orthanc Explorer
(served at /plugins/explorer.js) and nothing else.
"""
import json
import re

import orthanc

BUTTON_JS = """
(function () {
  var pageUrl = %s;
  $('#study').live('pagebeforecreate', function () {
    $('#study-anonymize').parent().after('<li data-icon="search">' +
      '<a href="#" id="mmdl-similar" target="_blank" rel="external noopener">Similar cases</a></li>');
  });
  $('#study').live('pagebeforeshow', function () {
    var link = $('#mmdl-similar').attr('href', '#');
    $.ajax({
      url: '../studies/' + $.mobile.pageData.uuid,
      dataType: 'json',
      success: function (study) {
        var uid = study.MainDicomTags.StudyInstanceUID;
        link.attr('href', pageUrl + '/studies/' + encodeURIComponent(uid) + '/similar');
      }
    });
  });
})();
"""


def page_url() -> str:
    """MmdlSimilar.PageUrl from Orthanc's configuration: the node's web base URL, without a trailing slash."""
    section = json.loads(orthanc.GetConfiguration()).get("MmdlSimilar", {})
    url = str(section.get("PageUrl", "")).rstrip("/")
    if not re.fullmatch(r"https?://[^\s\"'<>\\]+", url):
        raise ValueError(f"MmdlSimilar.PageUrl must be the node's http(s) base URL, got {url!r}")
    return url


try:
    orthanc.ExtendOrthancExplorer(BUTTON_JS % json.dumps(page_url()))
    orthanc.LogWarning("mmdl: 'Similar cases' button added to Orthanc Explorer")
except ValueError as error:
    orthanc.LogError(f"mmdl: no 'Similar cases' button: {error}")
