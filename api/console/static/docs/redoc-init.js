// ReDoc on this service's OpenAPI document; no Google Fonts (the page's CSP allows this origin only).
Redoc.init("/openapi.json", { hideDownloadButton: false }, document.getElementById("redoc"));
